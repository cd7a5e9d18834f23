"""Autoscaling as the simulator runs it: the app's UtilizationPolicy (its own
`desired_replicas`, imported from app/autoscaling.py) or Ray Serve's default policy (ongoing
requests / target_ongoing_requests), with Serve's look-back averaging, upscale/downscale delays
(ray/serve/autoscaling_policy.py _apply_delay_logic) and min/max replicas.

Assumptions: the controller decides every `period_s` (Ray: 0.1 s; 1 s here); every replica's
metrics are sampled at each decision and averaged over `look_back_s` (Ray's
look_back_period_s, 30 s); a new replica serves `replica_start_s` after the decision; a replica
taken away stops taking requests at once and leaves when its last one ends (Serve drains), the
newest first.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from app.autoscaling import desired_replicas
from loadtest.simulator.replica import Replica


@dataclass(frozen=True)
class AutoscaleConfig:
    policy: str = "utilization"  # or "ray_default"
    min_replicas: int = 1
    max_replicas: int = 64
    initial_replicas: int = 1
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_s: float = 30.0
    period_s: float = 1.0
    # UtilizationPolicy (serve_config.gpu.yaml: 0.7 and 48)
    target_kv_cache_usage: float = 0.7
    target_requests_per_replica: float = 48.0
    downscale_headroom: float = 0.8
    # Ray's default policy
    target_ongoing_requests: float = 48.0


class Autoscaler:
    def __init__(self, cfg: AutoscaleConfig):
        self.cfg = cfg
        self.samples: dict[int, deque[tuple[float, float, float]]] = {}
        self._decision_since: float | None = None
        self._direction = 0

    def sample(self, replicas: list[Replica], now: float) -> None:
        for r in replicas:
            q = self.samples.setdefault(r.idx, deque())
            q.append((now, r.kv_cache_usage(), float(r.ongoing)))
            while q and q[0][0] < now - self.cfg.look_back_s:
                q.popleft()

    def load(self, replicas: list[Replica], queued: int) -> float:
        """Replicas' worth of work, from look-back averages (UtilizationPolicy.load)."""
        cfg, total = self.cfg, 0.0
        for r in replicas:
            q = self.samples.get(r.idx)
            if not q:
                continue
            kv = sum(s[1] for s in q) / len(q)
            ongoing = sum(s[2] for s in q) / len(q)
            if cfg.policy == "utilization":
                per_requests = ongoing / cfg.target_requests_per_replica
                total += max(kv / cfg.target_kv_cache_usage, per_requests)
            else:
                total += ongoing / cfg.target_ongoing_requests
        per = cfg.target_requests_per_replica if cfg.policy == "utilization" else (
            cfg.target_ongoing_requests)  # fmt: skip
        return total + queued / per

    def decide(self, replicas: list[Replica], queued: int, target: int, now: float) -> int:
        """The new target replica count (Serve's delays applied)."""
        cfg = self.cfg
        load = self.load(replicas, queued)
        if cfg.policy == "utilization":
            desired = desired_replicas(load, target, cfg.downscale_headroom)
        else:
            desired = math.ceil(load - 1e-9)
        desired = max(cfg.min_replicas, min(cfg.max_replicas, desired))
        direction = (desired > target) - (desired < target)
        if direction == 0:
            self._decision_since, self._direction = None, 0
            return target
        if direction != self._direction:
            self._decision_since, self._direction = now, direction
        delay = cfg.upscale_delay_s if direction > 0 else cfg.downscale_delay_s
        if now - self._decision_since + 1e-6 >= delay:
            self._decision_since, self._direction = None, 0
            return desired
        return target
