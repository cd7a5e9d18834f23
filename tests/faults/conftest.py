from __future__ import annotations

import pytest

from tests.integration.app_under_test import METRICS_PORT, PORT, app_args


@pytest.fixture(scope="package")
def server(builtin):
    """Its own app (same settings and port as tests/integration, which runs after this package
    has shut it down): these tests kill its replicas."""
    import ray
    from ray import serve

    from app.main import build_app

    ray.init(
        num_cpus=8, include_dashboard=False, log_to_driver=False, _metrics_export_port=METRICS_PORT
    )
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(app_args()), name="moelora", route_prefix="/")
    yield
    serve.shutdown()
    ray.shutdown()
