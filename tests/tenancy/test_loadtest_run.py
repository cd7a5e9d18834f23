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
        "--run-dir", str(run), "--json-file", str(run / "locust"), "--only-summary",
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
    # Locust stops the users at the end: the requests then in flight are recorded as cancelled.
    statuses = Counter(r["status"] for r in rows)
    assert set(statuses) <= {"ok", "cancelled"} and statuses["cancelled"] <= 3, statuses
    rows = [r for r in rows if r["status"] == "ok"]
    per_tenant = Counter(r["tenant"] for r in rows)
    assert len(rows) >= 10 and set(per_tenant) <= set(names) and len(per_tenant) >= 2, per_tenant
    for r in rows:  # each tenant's own adapter, every token counted and timed
        assert r["model"] == "chat" and float(r["ttft_s"]) > 0 and int(r["prompt_tokens"]) > 0
        assert int(r["completion_tokens"]) == OUTPUT_TOKENS
        assert sum(int(e.split(":")[1]) for e in r["events"].split()) == OUTPUT_TOKENS

    # Locust's own stats, per tenant (its final JSON: the CSV is a snapshot up to 1 s old)
    stats = {(s["method"], s["name"]): s for s in json.loads((run / "locust.json").read_text())}
    # TPOT needs two events; vLLM merges tokens into one event when its consumer lags.
    with_tpot = Counter(r["tenant"] for r in rows if len(r["events"].split()) >= 2)
    for tenant, n in per_tenant.items():
        assert stats["POST", f"chat {tenant}"]["num_requests"] == n
        assert stats["POST", f"chat {tenant}"]["num_failures"] == 0
        assert stats["TTFT", tenant]["num_requests"] == n
        assert stats.get(("TPOT", tenant), {}).get("num_requests", 0) == with_tpot[tenant]
        assert stats["TTFT", tenant]["total_response_time"] > 0

    summary = {r["tenant"]: r for r in report.report(run, dpi=40)["summary"]}
    assert set(summary) == {*names, report.OVERALL}
    for tenant in names:
        assert summary[tenant]["ok"] == per_tenant.get(tenant, 0)
    overall = summary[report.OVERALL]
    assert overall["errors"] == 0 and overall["cancelled"] == statuses["cancelled"]
    assert overall["completion_tokens"] >= OUTPUT_TOKENS * len(rows)
    assert overall["ttft_p50_ms"] > 0 and overall["itl_p50_ms"] > 0
    for name in ("summary.csv", "timeseries.csv", "report.html", *report.PLOTS):
        assert (run / name).stat().st_size > 0
