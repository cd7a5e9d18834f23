"""A real Prometheus (the Debian package's binary) for tests: dashboards/prometheus.yml with only
its paths and intervals changed, in a temporary directory, and its HTTP API."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from tests.net import free_port

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = ROOT / "dashboards/prometheus.yml"
SHIPPED_DISCOVERY_FILE = "/tmp/ray/prom_metrics_service_discovery.json"


def local_config(discovery_file: Path, interval_s: int) -> dict:
    """The shipped scrape config, pointed at this Ray session's service-discovery file and the
    repository's alert rules, scraping and evaluating every `interval_s`."""
    cfg = yaml.safe_load(SHIPPED_CONFIG.read_text())
    (job,) = cfg["scrape_configs"]
    (sd,) = job["file_sd_configs"]
    assert sd["files"] == [SHIPPED_DISCOVERY_FILE], sd
    sd["files"] = [str(discovery_file)]
    cfg["rule_files"] = [str(SHIPPED_CONFIG.parent / f) for f in cfg["rule_files"]]
    cfg["global"] = {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"}
    return cfg


@contextmanager
def prometheus(config: dict, workdir: Path) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed (scripts/setup.sh installs it as root)"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(workdir / "prometheus.log", "w") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", workdir / "prometheus.log")
    try:
        deadline = time.monotonic() + 60
        while not prom.ready():
            assert proc.poll() is None, prom.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "Prometheus not ready in 60 s"
            time.sleep(0.5)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Prometheus:
    def __init__(self, url: str, log: Path):
        self.url = url
        self.log = log

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def api(self, path: str, **params) -> dict | list:
        """GET /api/v1/<path>; a PromQL error (bad query) fails with Prometheus's message."""
        resp = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", (params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step_s: float = 1) -> list[dict]:
        """What a Grafana time-series panel asks for."""
        return self.api("query_range", query=expr, start=start, end=end, step=step_s)["result"]


def finite_points(result: list[dict]) -> int:
    """Samples of a query result that are numbers (histogram_quantile of no traffic is NaN)."""
    values = [v for r in result for v in (r.get("values") or [r["value"]])]
    return sum(1 for _, v in values if math.isfinite(float(v)))
