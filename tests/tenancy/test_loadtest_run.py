"""A short headless Locust run of loadtest/locustfile.py against the tenancy package's app (the
admin API is on here): it creates its tenants, keys and adapters through the admin API, records
every request per tenant, removes the tenants at the end; the report reads the run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from loadtest import report
from tests.integration.app_under_test import BASE_URL
from tests.tenancy.admin_client import ADMIN_KEY, admin, ok

ROOT = Path(__file__).resolve().parents[2]
TENANTS = 3
OUTPUT_TOKENS = 8


def test_headless_locust_run_records_per_tenant_stats(server, tmp_path):
    run = tmp_path / "run"
    before = {t["name"] for t in ok(admin("GET", "/tenants"))}
    cmd = [
        str(Path(sys.executable).parent / "locust"),
        "-f", "loadtest/locustfile.py", "--headless", "-H", BASE_URL,
        "--tenants", str(TENANTS), "--zipf-s", "0.5",
        "--shape", "constant:users=3,duration=12",
        "--prompt-words", "uniform:3:12", "--output-tokens", f"fixed:{OUTPUT_TOKENS}",
        "--run-dir", str(run), "--csv", str(run / "locust"), "--only-summary",
    ]  # fmt: skip
    env = {**os.environ, "MOELORA_LT_ADMIN_KEY": ADMIN_KEY, "MOELORA_LT_SEED": "5"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    # Locust exits 1 when any request failed.
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    meta = json.loads((run / "run.json").read_text())
    names = [t["name"] for t in meta["tenants"]]
    assert len(names) == TENANTS and [t["rank"] for t in meta["tenants"]] == [1, 2, 3]
    assert meta["tenants_removed"] is True
    assert "key" not in json.dumps(meta["tenants"])  # keys never reach the run directory
    after = {t["name"] for t in ok(admin("GET", "/tenants"))}
    assert after == before and not set(names) & after  # the run's tenants are gone

    with open(run / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    per_tenant = Counter(r["tenant"] for r in rows)
    assert len(rows) >= 10 and set(per_tenant) <= set(names) and len(per_tenant) >= 2, per_tenant
    assert {r["status"] for r in rows} == {"ok"}
    for r in rows:  # each tenant's own adapter, every token counted and timed
        assert r["model"] == "chat" and float(r["ttft_s"]) > 0 and int(r["prompt_tokens"]) > 0
        assert int(r["completion_tokens"]) == OUTPUT_TOKENS
        assert sum(int(e.split(":")[1]) for e in r["events"].split()) == OUTPUT_TOKENS

    with open(run / "locust_stats.csv") as f:
        stats = {(s["Type"], s["Name"]): s for s in csv.DictReader(f)}
    for tenant, n in per_tenant.items():
        assert int(stats["POST", f"chat {tenant}"]["Request Count"]) == n
        assert int(stats["TTFT", tenant]["Request Count"]) == n
        assert int(stats["TPOT", tenant]["Request Count"]) == n
        assert float(stats["TTFT", tenant]["Median Response Time"]) > 0

    summary = {r["tenant"]: r for r in report.report(run, dpi=40)["summary"]}
    assert set(summary) == {*names, report.OVERALL}
    for tenant in names:
        assert summary[tenant]["requests"] == per_tenant.get(tenant, 0)
    assert summary[report.OVERALL]["completion_tokens"] == OUTPUT_TOKENS * len(rows)
    assert summary[report.OVERALL]["ttft_p50_ms"] > 0 and summary[report.OVERALL]["itl_p50_ms"] > 0
    for name in ("summary.csv", "timeseries.csv", "report.html", *report.PLOTS):
        assert (run / name).stat().st_size > 0
