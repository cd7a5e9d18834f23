"""What a run measured, defined as the load tests define it: TTFT from the request's arrival to
its first token at the client (the engine's first token plus the request path outside it);
ITL per token; tokens/s over the window from the first arrival to the last request's end."""

from __future__ import annotations

import numpy as np

from loadtest.simulator.fleet import RunResult


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float | None:
    if len(values) == 0 or weights.sum() == 0:
        return None
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, q / 100 * cum[-1])])


def summarize(run: RunResult, warmup_s: float = 0.0) -> dict:
    """Latency over requests arriving after `warmup_s`; counts and tokens over the whole run.
    A request without a first token by the end counts as an infinite TTFT."""
    reqs = run.requests
    measured = [r for r in reqs if r.arrival >= warmup_s]
    ttft = np.array(
        [r.first_token - r.arrival + run.overhead_s if r.first_token >= 0 else np.inf
         for r in measured]
    )  # fmt: skip
    done = [r for r in reqs if r.done >= 0]
    tokens = sum(r.output for r in done)
    start = min((r.arrival for r in reqs), default=0.0)
    end = max((r.done for r in done), default=start) + run.overhead_s
    itl = np.array(run.itl, dtype=float).reshape(-1, 2)
    replicas = run.replicas
    served = [r for r in replicas if r.served]
    replica_s = sum(min(r.stopped_at, run.end_s) - max(r.ready_at, 0.0) for r in replicas
                    if r.state != "starting" and r.stopped_at > r.ready_at)  # fmt: skip
    out = {
        "requests": len(reqs),
        "completed": len(done),
        "aborted": run.aborted,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": _r(weighted_percentile(itl[:, 0], itl[:, 1], 50)),
        "itl_p99_s": _r(weighted_percentile(itl[:, 0], itl[:, 1], 99)),
        "completion_tokens": tokens,
        "window_s": round(end - start, 2),
        "tokens_per_s": round(tokens / (end - start), 1) if end > start else None,
        "disk_loads": sum(r.disk_loads for r in replicas),
        "slot_loads": sum(r.slot_loads for r in replicas),
        "registrations": sum(len(r.registered) for r in replicas),
        "replicas_used": len(served),
        "replica_seconds": round(replica_s, 1),
        "peak_replicas": max(n for _, n in run.replica_timeline) if run.replica_timeline else None,
        "requests_per_replica": [r.served for r in served],
        "distinct_adapters_per_replica": [len(r.adapters_seen) for r in served],
    }
    tiers = getattr(run.router, "tiers", None)
    if tiers is not None:
        out["routing_tiers"] = dict(tiers)
    return out


def percentile(x: np.ndarray, q: float) -> float | None:
    """numpy's default (linear), as loadtest.report.percentile; a percentile that falls on or
    next to an unserved request (infinite TTFT) is infinite."""
    if len(x) == 0:
        return None
    v = float(np.percentile(np.where(np.isfinite(x), x, UNSERVED), q))
    return round(v, 3) if v < UNSERVED / 2 else float("inf")


UNSERVED = 1e12


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
