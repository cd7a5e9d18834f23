from __future__ import annotations

import pytest

from tests.integration.app_under_test import app_args, running_app


@pytest.fixture(scope="package")
def server(builtin):
    """Its own app (same settings and port as tests/integration, which runs after this package
    has shut it down): these tests kill its replicas."""
    with running_app(app_args()):
        yield
