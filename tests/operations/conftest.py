from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from app.tenancy import hash_api_key
from tests.integration.app_under_test import app_args, running_app
from tests.operations.prometheus_server import local_config, prometheus

# Ports of this package's app (not those of tests/integration: both may run at once).
PORT = 8775
METRICS_PORT = 8776
DASHBOARD_PORT = 8777
SCRAPE_INTERVAL_S = 1
RATE_LIMITED = ("zeta", "sk-zeta-ops-test")  # a tenant limited to 1 request/s: bursts get 429s
BROKEN_ADAPTER = "broken"  # acme's adapter whose files no engine accepts (a pickled .bin)


@pytest.fixture(scope="package")
def ops_app(builtin, tmp_path_factory):
    """The app (1 engine replica) on its own ports, with Ray's dashboard (it writes the
    Prometheus service-discovery file), one rate-limited tenant and one adapter that fails
    validation on load; Ray exports metrics every second."""
    state = tmp_path_factory.mktemp("ops-state")
    broken = state / "broken-adapter"
    shutil.copytree(builtin.adapter("acme-support"), broken)
    (broken / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    args = app_args()
    args["deployment"]["num_replicas"] = 1
    name, key = RATE_LIMITED
    limits = {"requests_per_s": 1}
    args["tenants"].append({"name": name, "api_key_sha256": [hash_api_key(key)], "limits": limits})
    args["adapters"].append({"name": BROKEN_ADAPTER, "path": str(broken), "owner": "acme"})
    args["registry"] = {"path": str(state / "registry.sqlite")}
    args["adapter_storage"] = {"cache_dir": str(state / "adapters")}
    # A short temp dir: Ray's unix socket paths must stay under 108 characters.
    ray_temp = Path(tempfile.mkdtemp(prefix="ray-ops-", dir="/tmp"))
    with running_app(
        args,
        port=PORT,
        metrics_port=METRICS_PORT,
        include_dashboard=True,
        dashboard_port=DASHBOARD_PORT,
        _temp_dir=str(ray_temp),
        _system_config={"metrics_report_interval_ms": 1000},
    ) as base_url:
        yield base_url, ray_temp
    shutil.rmtree(ray_temp, ignore_errors=True)


@pytest.fixture(scope="package")
def prom(ops_app, tmp_path_factory):
    """Prometheus scraping the app's Ray node through Ray's service-discovery file."""
    _, ray_temp = ops_app
    # The session's own file, not the link Ray keeps at <temp dir>/: Prometheus watches the
    # directory of the file for changes.
    session = (ray_temp / "session_latest").resolve()
    config = local_config(session / "prom_metrics_service_discovery.json", SCRAPE_INTERVAL_S)
    with prometheus(config, tmp_path_factory.mktemp("prometheus")) as server:
        yield server
