"""Per-tenant request metrics of the ingress, exported through Ray's metrics export (every node's
`/metrics` on Ray's metrics export port, names prefixed `ray_`), beside Ray Serve's `ray_serve_*`
and vLLM's `ray_vllm_*` families.

Labels are bounded: `tenant` is a configured tenant name (or `unauthenticated`), `model` the
base model or a configured adapter name (or `-` when the request never resolved one); a string
a client sent never becomes a label. Ray Serve adds the deployment and replica labels.

    moelora_requests_total{tenant, model, status}
    moelora_prompt_tokens_total{tenant, model}
    moelora_completion_tokens_total{tenant, model}
    moelora_request_duration_seconds{tenant, model}         end to end, as the ingress saw it
    moelora_time_to_first_token_seconds{tenant, model}      streams only
    moelora_inter_token_latency_seconds{tenant, model}      streams: mean gap between tokens
    moelora_streams_total{transport}                        link (app/token_link.py) | ray

and of each engine replica (`EngineMetrics`; Ray adds the replica label):

    moelora_fair_queue_wait_seconds{tenant}                 time waiting for a seat (queueing)
    moelora_adapter_loads_total{outcome}                    loaded | rejected
    moelora_adapter_load_seconds                            fetch + validate + load into vLLM
    moelora_resident_adapters{tier}                         accelerator (slots) | cpu (memory)
    moelora_tenant_engine_seconds_total{tenant}             engine time charged (app/usage.py)
    moelora_engine_busy_seconds_total                       time with requests inside the engine

of the adapter-aware request router (`RoutingMetrics`, in each ingress replica):

    moelora_routing_decisions_total{tier}                   accelerator | cpu | cold | base

and of the engine autoscaling policy (`AutoscalingMetrics`, in Serve's controller):

    moelora_autoscaling_load{deployment}                    work in replicas' worth
"""

from __future__ import annotations

from app.request_log import RequestRecord

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
ITL_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28]


class RequestMetrics:
    """Created inside an ingress replica (Ray's metrics need a running Ray worker)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        keys = ("tenant", "model")
        self.requests = Counter(
            "moelora_requests_total",
            description="Requests answered by the ingress, by tenant, model and HTTP status.",
            tag_keys=(*keys, "status"),
        )
        self.prompt_tokens = Counter(
            "moelora_prompt_tokens_total", description="Prompt tokens.", tag_keys=keys
        )
        self.completion_tokens = Counter(
            "moelora_completion_tokens_total", description="Completion tokens.", tag_keys=keys
        )
        self.duration = Histogram(
            "moelora_request_duration_seconds",
            description="End-to-end request time at the ingress.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=keys,
        )
        self.ttft = Histogram(
            "moelora_time_to_first_token_seconds",
            description="Time to the first streamed chunk at the ingress.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=keys,
        )
        self.itl = Histogram(
            "moelora_inter_token_latency_seconds",
            description="Mean time between output tokens of a stream, at the ingress.",
            boundaries=ITL_BOUNDARIES_S,
            tag_keys=keys,
        )
        self.streams = Counter(
            "moelora_streams_total",
            description="Streams by how their text reached the ingress: over the token link, "
            "or through Ray (no link configured, or the engine could not reach the ingress).",
            tag_keys=("transport",),
        )

    def observe(self, record: RequestRecord) -> None:
        if not record.path.startswith("/v1/"):
            return  # health and readiness probes are not traffic
        tags = {"tenant": record.tenant or "unauthenticated", "model": record.model or "-"}
        self.requests.inc(1, tags={**tags, "status": str(record.status)})
        if record.prompt_tokens:
            self.prompt_tokens.inc(record.prompt_tokens, tags=tags)
        if record.completion_tokens:
            self.completion_tokens.inc(record.completion_tokens, tags=tags)
        self.duration.observe(record.latency_ms / 1000, tags=tags)
        if record.transport is not None:
            self.streams.inc(1, tags={"transport": record.transport})
        if record.ttft_ms is not None:
            self.ttft.observe(record.ttft_ms / 1000, tags=tags)
            if record.completion_tokens and record.completion_tokens > 1:
                gaps = (record.latency_ms - record.ttft_ms) / (record.completion_tokens - 1)
                self.itl.observe(max(0.0, gaps) / 1000, tags=tags)


class EngineMetrics:
    """Created inside an engine replica."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.queue_wait = Histogram(
            "moelora_fair_queue_wait_seconds",
            description="Time a request waited for a seat in the engine's fair queue.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("tenant",),
        )
        self.adapter_loads = Counter(
            "moelora_adapter_loads_total",
            description="Adapter versions loaded into this engine, by outcome.",
            tag_keys=("outcome",),
        )
        self.adapter_load_time = Histogram(
            "moelora_adapter_load_seconds",
            description="Fetch, validation and load of an adapter version into vLLM.",
            boundaries=LATENCY_BOUNDARIES_S,
        )
        self.engine_seconds = Counter(
            "moelora_tenant_engine_seconds_total",
            description="Engine time charged to a tenant: each busy second shared equally "
            "among the requests inside the engine.",
            tag_keys=("tenant",),
        )
        self.busy_seconds = Counter(
            "moelora_engine_busy_seconds_total",
            description="Time this engine had requests inside it (the sum of all charges).",
        )
        self.resident = Gauge(
            "moelora_resident_adapters",
            description="Adapter versions held by this engine, by tier.",
            tag_keys=("tier",),
        )


class RoutingMetrics:
    """Created by the request router inside a Ray worker (app/request_router.py)."""

    def __init__(self):
        from ray.serve.metrics import Counter

        self.decisions = Counter(
            "moelora_routing_decisions_total",
            description="Engine replicas chosen by the adapter-aware router, by the tier the "
            "chosen replica was in for the request's adapter.",
            tag_keys=("tier",),
        )


class AutoscalingMetrics:
    """Created by the autoscaling policy in the process that runs it (app/autoscaling.py)."""

    def __init__(self):
        from ray.util.metrics import Gauge

        self.load = Gauge(
            "moelora_autoscaling_load",
            description="Engine work in replicas' worth, as the autoscaling policy saw it.",
            tag_keys=("deployment",),
        )
