"""Autoscaling the engine deployment on utilization, not just on request counts.

Ray Serve's default policy counts ongoing requests. For LLM engines the scarce resource is often
the KV cache (long contexts) or the batch itself (many short requests), so this policy sizes the
deployment by whichever is tighter, per replica, from the stats each engine replica publishes
through `record_autoscaling_stats` (app/engine.py; "waiting" includes the replica's fair queue):

    load(replica) = max(kv_cache_usage / target_kv_cache_usage,
                        (running + waiting) / target_requests_per_replica)
    load          = sum of loads + requests queued at the handles / target_requests_per_replica
    up            = ceil(load)
    down to d     only when load <= d * downscale_headroom (each of d replicas <= 80% loaded)

The headroom band is the hysteresis: a load hovering around a whole number of replicas does not
flap between two counts. Serve still applies upscale/downscale delays and min/max replicas on
top of the returned number, and drains a replica before stopping it (its in-flight and queued
requests finish; Serve counts them as the replica's ongoing requests). Scale to zero: set
`min_replicas: 0` (off by default); a request arriving then is queued at the handle, which this
policy counts, and Serve's cold-start path starts a replica at once.

Every change of the wanted count is logged (Serve controller log) with the inputs that led to it,
and the inputs again every `log_every_s` while it holds.
Use it with `autoscaling_config.policy: {policy_function: app.autoscaling:UtilizationPolicy,
policy_kwargs: {...}}`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from app.contract import AutoscalingStat
from app.metrics import AutoscalingMetrics

logger = logging.getLogger("ray.serve")

_metrics: AutoscalingMetrics | None = None  # in the process running the policy (the controller)


def _export_load(deployment: str, load: float) -> None:
    """The policy's input as a metric (Serve itself exports the target and running replicas)."""
    global _metrics
    import ray

    if not ray.is_initialized():
        return
    try:
        if _metrics is None:
            _metrics = AutoscalingMetrics()
        _metrics.load.set(load, tags={"deployment": deployment})
    except Exception:  # noqa: BLE001 - metrics must never break scaling
        logger.debug("autoscaling load not exported", exc_info=True)


def desired_replicas(load: float, current: int, downscale_headroom: float) -> int:
    """Replicas for `load` (in replicas' worth of work), from `current`, with hysteresis."""
    up = math.ceil(load - 1e-9)
    if up >= current:
        return up
    return min(current, max(up, math.ceil(load / downscale_headroom - 1e-9)))


class UtilizationPolicy:
    """The policy (module docstring). A class, because Ray Serve passes `policy_kwargs` only to
    a class's constructor: for a plain function they are silently ignored."""

    def __init__(
        self,
        target_kv_cache_usage: float = 0.7,
        target_requests_per_replica: float = 32.0,
        downscale_headroom: float = 0.8,
        log_every_s: float = 60.0,
    ):
        if not (target_kv_cache_usage > 0 and target_requests_per_replica > 0):
            raise ValueError("targets must be > 0")
        if not 0 < downscale_headroom <= 1:
            raise ValueError("downscale_headroom must be in (0, 1]")
        self.target_kv = target_kv_cache_usage
        self.target_requests = target_requests_per_replica
        self.headroom = downscale_headroom
        self.log_every_s = log_every_s
        self._logged_at = float("-inf")

    def load(self, ctx) -> tuple[float, dict[str, dict]]:
        """Replicas' worth of work, and the per-replica inputs it came from."""
        metrics = ctx.aggregated_metrics or {}
        inputs = {
            "kv": metrics.get(AutoscalingStat.KV_CACHE_USAGE.value, {}),
            "running": metrics.get(AutoscalingStat.RUNNING_REQUESTS.value, {}),
            "waiting": metrics.get(AutoscalingStat.WAITING_REQUESTS.value, {}),
        }
        kv, running, waiting = inputs.values()
        replicas = set(kv) | set(running) | set(waiting)
        queued = ctx.total_queued_requests or 0.0
        if not replicas:  # no engine stats yet (replicas starting): fall back to request counts
            return max(ctx.total_num_requests or 0.0, queued) / self.target_requests, inputs
        load = sum(
            max(
                kv.get(r, 0.0) / self.target_kv,
                (running.get(r, 0.0) + waiting.get(r, 0.0)) / self.target_requests,
            )
            for r in replicas
        )
        return load + queued / self.target_requests, inputs

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        load, inputs = self.load(ctx)
        current = ctx.current_num_replicas
        desired = desired_replicas(load, current, self.headroom)
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        desired = max(lo, min(hi, desired))
        _export_load(str(ctx.deployment_name), load)

        state = dict(ctx.policy_state or {})
        now = time.monotonic()
        changed = state.get("wanted") != desired
        if changed or now - self._logged_at >= self.log_every_s:
            logger.info(
                "autoscaling %s: %s %d replicas (now %d): load %.2f from kv %s, running %s, "
                "waiting %s, queued at handles %.0f",
                ctx.deployment_name, "want" if changed else "holds", desired, current, load,
                *(_rounded(v) for v in inputs.values()), ctx.total_queued_requests or 0.0,
            )  # fmt: skip
            self._logged_at = now
        state.update(wanted=desired, load=round(load, 3))
        return desired, state


def _rounded(per_replica: dict) -> dict:
    return {str(r)[-8:]: round(float(v), 2) for r, v in per_replica.items()}
