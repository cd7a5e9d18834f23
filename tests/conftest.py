from __future__ import annotations

import pytest

from app.builtin_model import BuiltinPaths, ensure_builtin_model


@pytest.fixture(scope="session")
def builtin() -> BuiltinPaths:
    """The built-in model and demo adapters, generated once into the cache ($MOELORA_CACHE)."""
    return ensure_builtin_model()
