"""The dashboards and alert rules against a real Prometheus scraping the real app under load.

Prometheus (the Debian package) runs dashboards/prometheus.yml with only paths and intervals
changed: it finds the app's Ray node through Ray's service-discovery file and loads
dashboards/alerts.yml. Several tenants send real traffic with the official `openai` client,
successes and failures (401, 400, 404, 429, and 503 from an adapter no engine accepts). Then
every panel query of every generated dashboard, with Grafana's variables resolved as Grafana
would, must be valid PromQL and return numbers over the load's time range; every alert
expression must be valid, and the vector each alert compares to its threshold must return
numbers (the alerts themselves do not fire in a healthy test: dashboards/alerts_test.yml shows
each firing, with promtool).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import yaml

from app.builtin_model import BUILTIN_MODEL_NAME, DEMO_TENANTS
from tests.operations.conftest import (
    BROKEN_ADAPTER,
    METRICS_PORT,
    RATE_LIMITED,
    SCRAPE_INTERVAL_S,
)
from tests.operations.prometheus_server import ROOT, finite_points

pytestmark = pytest.mark.engine

TENANTS = {t.name: t for t in DEMO_TENANTS}
# Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval); panels
# over the few minutes of this test have $__interval below the scrape interval.
RATE_INTERVAL = f"{4 * SCRAPE_INTERVAL_S}s"
# Each alert's vector before its threshold: must return numbers from the app's real metrics.
# (Written out, and checked to be part of the alert's expression, so an alert cannot go
# unchecked or be checked against something else.)
ALERT_VECTORS = {
    "MoeloraServerErrors": 'sum(rate(ray_moelora_requests_total{status=~"5.."}[5m])) '
    "/ clamp_min(sum(rate(ray_moelora_requests_total[5m])), 1e-9)",
    "MoeloraNoHealthyEngine": 'sum(ray_serve_deployment_replica_healthy{deployment="Engine"})',
    "MoeloraSlowFirstToken": "histogram_quantile(0.99, sum by (le, tenant) "
    "(rate(ray_moelora_time_to_first_token_seconds_bucket[5m])))",
    "MoeloraTenantRateLimited": 'sum by (tenant) (rate(ray_moelora_requests_total{status="429"}'
    "[5m])) / sum by (tenant) (rate(ray_moelora_requests_total[5m]))",
    "MoeloraAdapterLoadFailures": "sum(rate(ray_moelora_adapter_loads_total"
    '{outcome="rejected"}[10m]))',
    "MoeloraKVCacheFull": "max(ray_vllm_kv_cache_usage_perc)",
    "MoeloraTokenLinkFallback": '(sum(rate(ray_moelora_streams_total{transport="ray"}[10m])) '
    "or vector(0)) / clamp_min(sum(rate(ray_moelora_streams_total[10m])), 1e-9)",
}
DATA_TIMEOUT_S = 180


def squeeze(expr: str) -> str:
    return re.sub(r"\s+", "", expr)


def dashboards() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "dashboards").glob("*.json"))}


def alert_rules() -> list[dict]:
    rules = yaml.safe_load((ROOT / "dashboards/alerts.yml").read_text())
    return [r for g in rules["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def load(ops_app, prom):
    """Real traffic from every demo tenant; returns (start, end, statuses by tenant)."""
    base_url, _ = ops_app
    limited, limited_key = RATE_LIMITED
    statuses: dict[str, Counter] = {t: Counter() for t in [*TENANTS, limited, "nobody"]}
    lock = threading.Lock()

    def send(tenant: str, key: str, model: str, stream: bool = False, **kw) -> None:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
        body = dict(model=model, messages=[{"role": "user", "content": "Where is my order?"}])
        body |= dict(max_tokens=8, temperature=0, extra_body={"ignore_eos": True}) | kw
        try:
            if stream:
                chunks = list(client.chat.completions.create(stream=True, **body))
                assert chunks
            else:
                client.chat.completions.create(**body)
            status = 200
        except openai.APIStatusError as err:
            status = err.status_code
        with lock:
            statuses[tenant][status] += 1

    def tenant_traffic(name: str) -> None:
        key, own = TENANTS[name].api_key, TENANTS[name].adapter
        for _ in range(2):
            send(name, key, own)
            send(name, key, own, stream=True)
            send(name, key, BUILTIN_MODEL_NAME, stream=True)
            time.sleep(0.5)
        send(name, key, "shared-assistant", stream=True)

    start = time.time()
    # Wait for Prometheus to have scraped the node once (it found it through the file).
    deadline = time.monotonic() + 60
    while not prom.query(f'up{{instance=~".*:{METRICS_PORT}"}} == 1'):
        assert time.monotonic() < deadline, prom.api("targets")
        time.sleep(1)

    def burst() -> None:  # beyond 1 request/s
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda _: send(limited, limited_key, BUILTIN_MODEL_NAME), range(6)))

    burst()
    with ThreadPoolExecutor(len(TENANTS)) as pool:
        list(pool.map(tenant_traffic, TENANTS))
    acme = TENANTS["acme"].api_key
    send("acme", acme, "no-such-model")  # 404
    send("acme", acme, BUILTIN_MODEL_NAME, max_tokens=0)  # 400
    send("nobody", "sk-not-a-key", BUILTIN_MODEL_NAME)  # 401
    for _ in range(2):
        send("acme", acme, BROKEN_ADAPTER)  # 503: rejected on load
    # Ray exports a counter from its first increment on, so a rate needs increments after
    # Prometheus first saw the series: a second burst once it has the first one's 429s.
    deadline = time.monotonic() + 60
    while not prom.query(f'ray_moelora_requests_total{{tenant="{limited}", status="429"}}'):
        assert time.monotonic() < deadline, "the first burst's 429s never reached Prometheus"
        time.sleep(1)
    burst()
    end = time.time()
    print(f"load: {end - start:.0f} s, statuses:", {t: dict(c) for t, c in statuses.items()})
    assert statuses["acme"][404] == 1 and statuses["acme"][400] == 1, statuses
    assert statuses["acme"][503] == 2 and statuses["nobody"][401] == 1, statuses
    assert statuses[limited][429] >= 6 and statuses[limited][200] >= 2, statuses
    for name in TENANTS:
        assert statuses[name][200] == 7, statuses
    return start, end, statuses


def resolve(expr: str, variables: dict[str, str]) -> str:
    for name, value in variables.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in expr, f"unresolved Grafana variable in {expr}"
    return expr


def grafana_variables(prom, board: dict) -> dict[str, str]:
    """Values of a dashboard's query variables as Grafana gets them (label_values(metric,
    label): Prometheus's label values API), each set to All: Grafana's (a|b|...) regex."""
    variables = {"__rate_interval": RATE_INTERVAL}
    for var in board.get("templating", {}).get("list", []):
        if var["type"] != "query":
            continue
        query = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
        metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).groups()
        # Every tenant that sent traffic is a value (once Prometheus has scraped its last one).
        want = {*TENANTS, RATE_LIMITED[0]} if var["name"] == "tenant" else set()
        deadline = time.monotonic() + DATA_TIMEOUT_S
        while True:
            values = prom.api(f"label/{label}/values", **{"match[]": metric})
            if values and want <= set(values) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert values and want <= set(values), (var["name"], metric, label, values)
        variables[var["name"]] = "(" + "|".join(re.escape(v) for v in values) + ")"
    return variables


def wait_for_data(
    prom, queries: dict[str, str], start: float, tenants: dict[str, set[str]] | None = None
) -> dict[str, list[dict]]:
    """Query each over [start, now] until all return numbers, the queries named in `tenants`
    for each of those tenants (Ray exports every second, Prometheus scrapes every second), or
    DATA_TIMEOUT_S passes; the last results."""
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while True:
        results = {q: prom.query_range(e, start, time.time()) for q, e in queries.items()}
        missing = [f"{q}: {queries[q]}" for q, r in results.items() if not finite_points(r)]
        for q, want in (tenants or {}).items():
            shown = {r["metric"].get("tenant") for r in results[q] if finite_points([r])}
            if want - shown:
                missing.append(f"{q}: no data for tenants {sorted(want - shown)}")
        if not missing or time.monotonic() > deadline:
            assert not missing, "no data:\n" + "\n".join(missing)
            return results
        time.sleep(2)


def test_prometheus_finds_the_node_through_rays_discovery_file(prom, load):
    targets = prom.api("targets")["activeTargets"]
    node = [t for t in targets if t["labels"]["instance"].endswith(f":{METRICS_PORT}")]
    assert node and node[0]["health"] == "up", targets


def test_every_dashboard_panel_query_returns_data(prom, load):
    start, _, _ = load
    queries, tenants = {}, {}
    for uid, board in dashboards().items():
        variables = grafana_variables(prom, board)
        for panel in board["panels"]:
            for i, target in enumerate(panel.get("targets", [])):
                name = f"{uid} / {panel['title']} / {target.get('legendFormat', i)}"
                queries[name] = resolve(target["expr"], variables)
                # Per-tenant panels show each tenant that had such traffic.
                if "{{tenant}}" in target.get("legendFormat", ""):
                    refused = "Refused" in panel["title"]
                    tenants[name] = {"acme", RATE_LIMITED[0]} if refused else set(TENANTS)
    assert len(queries) >= 15, queries
    wait_for_data(prom, queries, start - 10, tenants)


def test_every_alert_expression_is_valid_and_its_vector_returns_data(prom, load):
    start, _, _ = load
    rules = {r["alert"]: r["expr"] for r in alert_rules()}
    assert set(ALERT_VECTORS) == set(rules), "every alert needs its vector here"
    for alert, vector in ALERT_VECTORS.items():
        assert squeeze(vector) in squeeze(rules[alert]), alert
    for expr in rules.values():
        prom.query(expr)  # valid PromQL (an error fails inside)
    results = wait_for_data(prom, ALERT_VECTORS, start - 10)
    # A healthy app: an engine is up and that alert's full expression is empty.
    healthy = results["MoeloraNoHealthyEngine"][0]["values"][-1][1]
    assert float(healthy) >= 1, healthy
    assert prom.query(rules["MoeloraNoHealthyEngine"]) == []


def test_prometheus_evaluates_every_alert_rule_without_error(prom, load):
    loaded = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in loaded} == {r["alert"] for r in alert_rules()}
    for rule in loaded:
        assert rule["health"] == "ok", rule
