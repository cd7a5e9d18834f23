from __future__ import annotations

import pytest

from tests.integration.app_under_test import app_args, running_app

USAGE_PERIOD_S = 2.0


@pytest.fixture(scope="package")
def usage_dir(tmp_path_factory):
    """Where the engine replicas append their usage lines (app/usage.py)."""
    return tmp_path_factory.mktemp("usage")


@pytest.fixture(scope="package")
def server(builtin, usage_dir):
    """The app, started once for every integration test module."""
    args = app_args()
    args["usage"] = {"dir": str(usage_dir), "period_s": USAGE_PERIOD_S}
    with running_app(args) as base_url:
        yield base_url
