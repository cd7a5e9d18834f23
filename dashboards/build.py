"""Grafana dashboards of the app, as code (grafana-foundation-sdk), written as JSON beside it.

    .venv/bin/python -m dashboards.build        # writes dashboards/*.json

Two dashboards over a Prometheus datasource scraping Ray's metrics export port of every node:
`moelora-tenants` (per tenant and model: traffic by status, rate-limited requests, tokens,
TTFT, inter-token latency, fair-queue wait) and `moelora-engines` (per engine replica: resident
adapters, adapter loads, KV-cache use, running and waiting requests, replica health and the
autoscaler's target). Import the JSON files in Grafana; `dashboards/alerts.yml` holds the
Prometheus alerting rules. tests/unit/test_dashboards.py checks that every query names a metric
the app, vLLM or Ray Serve exports.
"""

from __future__ import annotations

import json
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

HERE = Path(__file__).resolve().parent
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
TENANT = 'tenant=~"$tenant"'
# Grafana's rate window: at least 4 scrape intervals of the datasource (timeInterval).
RATE = "$__rate_interval"


def panel(title: str, unit: str, *queries: tuple[str, str]) -> timeseries.Panel:
    p = timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).height(8).span(12)
    for expr, legend in queries:
        p = p.with_target(prometheus.Dataquery().expr(expr).legend_format(legend))
    return p


def rate(metric: str, where: str = TENANT) -> str:
    selector = f"{metric}{{{where}}}" if where else metric
    return f"rate({selector}[{RATE}])"


def quantile(q: float, metric: str, by: str, where: str = TENANT) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) ({rate(metric + '_bucket', where)}))"


def tenants_dashboard() -> dashboard.Dashboard:
    return (
        dashboard.Dashboard("moelora: tenants")
        .uid("moelora-tenants")
        .tags(["moelora"])
        .refresh("30s")
        .time("now-1h", "now")
        .with_variable(dashboard.DatasourceVariable("datasource").type("prometheus"))
        .with_variable(
            dashboard.QueryVariable("tenant")
            .query("label_values(ray_moelora_requests_total, tenant)")
            .datasource(DATASOURCE)
            .multi(True)
            .include_all(True)
        )
        .with_row(dashboard.Row("Traffic"))
        .with_panel(
            panel(
                "Requests/s by tenant and status",
                "reqps",
                (
                    f"sum by (tenant, status) ({rate('ray_moelora_requests_total')})",
                    "{{tenant}} {{status}}",
                ),
            )
        )
        .with_panel(
            panel(
                "Refused: rate-limited (429), over a ceiling (400/403)",
                "reqps",
                (
                    "sum by (tenant, status) ("
                    + rate("ray_moelora_requests_total", f'{TENANT}, status=~"429|400|403"')
                    + ")",
                    "{{tenant}} {{status}}",
                ),
            )
        )
        .with_panel(
            panel(
                "Completion tokens/s by tenant",
                "short",
                (
                    f"sum by (tenant) ({rate('ray_moelora_completion_tokens_total')})",
                    "{{tenant}}",
                ),
            )
        )
        .with_panel(
            panel(
                "Prompt tokens/s by tenant",
                "short",
                (
                    f"sum by (tenant) ({rate('ray_moelora_prompt_tokens_total')})",
                    "{{tenant}}",
                ),
            )
        )
        .with_row(dashboard.Row("Latency"))
        .with_panel(
            panel(
                "Time to first token p50 / p99",
                "s",
                (
                    quantile(0.5, "ray_moelora_time_to_first_token_seconds", "tenant"),
                    "p50 {{tenant}}",
                ),
                (
                    quantile(0.99, "ray_moelora_time_to_first_token_seconds", "tenant"),
                    "p99 {{tenant}}",
                ),
            )
        )
        .with_panel(
            panel(
                "Inter-token latency p50 / p99",
                "s",
                (
                    quantile(0.5, "ray_moelora_inter_token_latency_seconds", "tenant"),
                    "p50 {{tenant}}",
                ),
                (
                    quantile(0.99, "ray_moelora_inter_token_latency_seconds", "tenant"),
                    "p99 {{tenant}}",
                ),
            )
        )
        .with_panel(
            panel(
                "End-to-end latency p99",
                "s",
                (quantile(0.99, "ray_moelora_request_duration_seconds", "tenant"), "{{tenant}}"),
            )
        )
        .with_panel(
            panel(
                "Fair-queue wait p99 (time waiting for an engine seat)",
                "s",
                (quantile(0.99, "ray_moelora_fair_queue_wait_seconds", "tenant"), "{{tenant}}"),
            )
        )
        .with_row(dashboard.Row("Usage"))
        .with_panel(
            panel(
                "Engine time used (engine-seconds/s: share of the fleet's engines)",
                "short",
                (
                    f"sum by (tenant) ({rate('ray_moelora_tenant_engine_seconds_total')})",
                    "{{tenant}}",
                ),
            )
        )
    )


def engines_dashboard() -> dashboard.Dashboard:
    engine = 'deployment="Engine"'
    return (
        dashboard.Dashboard("moelora: engines")
        .uid("moelora-engines")
        .tags(["moelora"])
        .refresh("30s")
        .time("now-1h", "now")
        .with_variable(dashboard.DatasourceVariable("datasource").type("prometheus"))
        .with_row(dashboard.Row("Adapters"))
        .with_panel(
            panel(
                "Resident adapters by replica and tier",
                "short",
                ("sum by (replica, tier) (ray_moelora_resident_adapters)", "{{replica}} {{tier}}"),
            )
        )
        .with_panel(
            panel(
                "Adapter loads/s by outcome",
                "short",
                (
                    f"sum by (outcome) ({rate('ray_moelora_adapter_loads_total', '')})",
                    "{{outcome}}",
                ),
                (
                    quantile(0.99, "ray_moelora_adapter_load_seconds", "replica", where=""),
                    "load time p99 {{replica}}",
                ),
            )
        )
        .with_panel(
            panel(
                "Routing decisions/s by tier (where the chosen replica had the adapter)",
                "short",
                (
                    f"sum by (tier) ({rate('ray_moelora_routing_decisions_total', '')})",
                    "{{tier}}",
                ),
            )
        )
        .with_row(dashboard.Row("vLLM"))
        .with_panel(
            panel(
                "KV-cache use",
                "percentunit",
                ("max by (WorkerId) (ray_vllm_kv_cache_usage_perc)", "{{WorkerId}}"),
            )
        )
        .with_panel(
            panel(
                "Running and waiting requests",
                "short",
                ("sum(ray_vllm_num_requests_running)", "running"),
                ("sum(ray_vllm_num_requests_waiting)", "waiting"),
            )
        )
        .with_row(dashboard.Row("Replicas"))
        .with_panel(
            panel(
                "Healthy replicas by deployment",
                "short",
                (
                    "sum by (deployment) (ray_serve_deployment_replica_healthy)",
                    "{{deployment}}",
                ),
            )
        )
        .with_panel(
            panel(
                "Engine replicas: autoscaler target",
                "short",
                (f"max(ray_serve_autoscaling_target_replicas{{{engine}}})", "target"),
                (f"sum(ray_serve_deployment_replica_healthy{{{engine}}})", "healthy"),
            )
        )
    )


def write_all() -> list[Path]:
    written = []
    for board in (tenants_dashboard(), engines_dashboard()):
        built = board.build()
        path = HERE / f"{built.uid}.json"
        path.write_text(
            json.dumps(json.loads(JSONEncoder(indent=1).encode(built)), indent=1) + "\n"
        )
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_all():
        print(path)
