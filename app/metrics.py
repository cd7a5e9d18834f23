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
"""

from __future__ import annotations

from app.request_log import RequestRecord

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


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
        if record.ttft_ms is not None:
            self.ttft.observe(record.ttft_ms / 1000, tags=tags)
