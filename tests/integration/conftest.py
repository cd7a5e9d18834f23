from __future__ import annotations

import pytest

from tests.integration.app_under_test import app_args, running_app


@pytest.fixture(scope="package")
def server(builtin):
    """The app, started once for every integration test module."""
    with running_app(app_args()) as base_url:
        yield base_url
