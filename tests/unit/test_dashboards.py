"""The Grafana dashboards and alert rules query only metrics that exist, and the committed JSON
is what dashboards/build.py generates. Metric names are taken from the sources that define
them: app/metrics.py, vLLM's stat loggers (`vllm:x` is exported by Ray as `ray_vllm_x`) and
Ray Serve's own metrics; promtool checks the rules where it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = ("_bucket", "_count", "_sum")


def exported_names() -> set[str]:
    import ray.serve
    import vllm.v1.metrics.loggers as vllm_loggers

    names = {
        f"ray_{n}"
        for n in re.findall(r'"(moelora_[a-z_]+)"', (ROOT / "app/metrics.py").read_text())
    }
    names |= {
        f"ray_vllm_{n}"
        for n in re.findall(r'"vllm:([a-z_]+)"', Path(vllm_loggers.__file__).read_text())
    }
    for source in Path(ray.serve.__file__).parent.rglob("*.py"):
        names |= {f"ray_{n}" for n in re.findall(r'"(serve_[a-z_]+)"', source.read_text())}
    return names


def queries() -> list[str]:
    found = []
    for board in (ROOT / "dashboards").glob("*.json"):
        for p in json.loads(board.read_text())["panels"]:
            found += [t["expr"] for t in p.get("targets", [])]
    rules = yaml.safe_load((ROOT / "dashboards/alerts.yml").read_text())
    found += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return found


def test_every_query_names_an_exported_metric():
    known = exported_names()
    assert "ray_moelora_requests_total" in known and "ray_vllm_kv_cache_usage_perc" in known
    used = set()
    for expr in queries():
        for name in re.findall(r"\bray_[a-z_]+", expr):
            for suffix in SUFFIXES:
                name = name.removesuffix(suffix)
            used.add(name)
    assert used and used <= known, sorted(used - known)


def test_committed_dashboards_are_generated(tmp_path, monkeypatch):
    from dashboards import build

    monkeypatch.setattr(build, "HERE", tmp_path)
    for path in build.write_all():
        assert path.read_text() == (ROOT / "dashboards" / path.name).read_text(), path.name


def promtool(*args: str) -> None:
    out = subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (scripts/setup.sh as root)"
)


@needs_promtool
def test_alert_rules_and_scrape_config_pass_promtool():
    promtool("check", "rules", "dashboards/alerts.yml")
    promtool("check", "config", "dashboards/prometheus.yml")


@needs_promtool
def test_alert_rules_fire_on_their_cases():
    """dashboards/alerts_test.yml: every alert fires when it should and only then."""
    tested = set(re.findall(r"alertname: (\w+)", (ROOT / "dashboards/alerts_test.yml").read_text()))
    rules = yaml.safe_load((ROOT / "dashboards/alerts.yml").read_text())
    assert tested == {r["alert"] for g in rules["groups"] for r in g["rules"]}
    promtool("test", "rules", "dashboards/alerts_test.yml")


def test_grafana_provisioning_points_at_the_generated_dashboards():
    prov = ROOT / "dashboards/grafana/provisioning"
    (source,) = yaml.safe_load((prov / "datasources/moelora.yml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    (provider,) = yaml.safe_load((prov / "dashboards/moelora.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "$MOELORA_DASHBOARDS"
    for board in (ROOT / "dashboards").glob("*.json"):  # any Prometheus datasource will do
        assert json.loads(board.read_text())["templating"]["list"][0]["type"] == "datasource"
