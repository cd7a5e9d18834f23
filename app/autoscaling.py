"""Autoscaling the engine deployment on utilization, not just on request counts.

Ray Serve's default policy counts ongoing requests. For LLM engines the scarce resource is often
the KV cache (long contexts) or the batch itself (many short requests), so this policy sizes the
deployment by whichever is tighter, per replica, from the stats each engine replica publishes
through `record_autoscaling_stats` (app/engine.py):

    load(replica) = max(kv_cache_usage / target_kv_cache_usage,
                        (running + waiting) / target_requests_per_replica)
    desired       = ceil(sum of loads
                         + requests queued at the handles / target_requests_per_replica)

Serve still applies upscale/downscale delays and min/max replicas on top of the returned number.
Use it with `autoscaling_config.policy: {policy_function: app.autoscaling:utilization_policy,
policy_kwargs: {...}}`.
"""

from __future__ import annotations

import math
from typing import Any

from app.contract import AutoscalingStat


def utilization_policy(
    ctx, target_kv_cache_usage: float = 0.7, target_requests_per_replica: float = 32.0
) -> tuple[int, dict[str, Any]]:
    metrics = ctx.aggregated_metrics or {}
    kv = metrics.get(AutoscalingStat.KV_CACHE_USAGE.value, {})
    running = metrics.get(AutoscalingStat.RUNNING_REQUESTS.value, {})
    waiting = metrics.get(AutoscalingStat.WAITING_REQUESTS.value, {})
    replicas = set(kv) | set(running) | set(waiting)
    if replicas:
        load = sum(
            max(
                kv.get(r, 0.0) / target_kv_cache_usage,
                (running.get(r, 0.0) + waiting.get(r, 0.0)) / target_requests_per_replica,
            )
            for r in replicas
        )
        load += (ctx.total_queued_requests or 0.0) / target_requests_per_replica
    else:  # no engine stats yet (replicas starting): fall back to request counts
        load = (ctx.total_num_requests or 0.0) / target_requests_per_replica
    desired = math.ceil(load - 1e-9)
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    desired = max(lo, min(hi, desired))
    return desired, {"load": load}
