"""Adapter-aware replica choice: a custom Ray Serve RequestRouter for the engine deployment.

The adapter of a request travels as its multiplexed model id (set by the ingress).
Replicas are ranked in tiers; Ray Serve then takes the shortest queue within the first tier that
has a replica with capacity:

  1. replicas where the adapter is resident on the accelerator (in a LoRA slot),
  2. replicas holding it in CPU memory (loading it into a slot is cheap),
  3. every replica (least loaded wins, then the one holding the fewest adapters; the adapter
     is loaded from disk there).

Residency comes from the replicas' published routing stats (app/contract.py RoutingStats),
refreshed every few seconds, plus what this router itself sent recently (so a burst for a new
adapter sticks to one replica before the next stats arrive). A load bound keeps a popular
adapter from piling onto one replica while others idle: a replica stays in tiers 1-2 only while
its queue is at most `imbalance_threshold` longer than the least loaded candidate's.
Replicas whose stats say their engine failed are skipped.

The routers also tell their process how many replicas they can send to (app/dispatch.py
`publish_routable`): the ingress's cheap answer to "does any engine replica run?".

Each decision is counted by the tier of the replica chosen (`moelora_routing_decisions_total
{tier}`: accelerator, cpu, cold, or base for requests without an adapter), so the dashboards
show how often a request lands where its adapter already is.
"""

from __future__ import annotations

import random
import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from app.contract import RoutingStats
from app.dispatch import publish_routable
from app.metrics import RoutingMetrics

# How long a routing decision of this router counts as "the adapter is there" by itself.
RECENT_ROUTE_TTL_S = 30.0

_metrics: RoutingMetrics | None = None  # one per process: a router is made for every handle


def _routing_metrics() -> RoutingMetrics | None:
    """Inside a Ray worker; None elsewhere (unit tests)."""
    global _metrics
    if _metrics is None:
        import ray

        if not ray.is_initialized():
            return None
        _metrics = RoutingMetrics()
    return _metrics


def _adapters_held(replica: RunningReplica) -> int:
    stats = RoutingStats.parse(replica.routing_stats)
    return len(set(stats.accelerator_adapters) | set(stats.cpu_adapters))


def serving_replicas(candidates: list[RunningReplica]) -> list[RunningReplica]:
    """Candidates without those whose stats say their engine failed (such a replica exits
    within a second, see app/engine.py; this covers the stats that arrive first). If every
    replica failed, all of them: they refuse at once and the client gets a fast 503."""
    serving = [r for r in candidates if RoutingStats.parse(r.routing_stats).serving]
    return serving or candidates


class AdapterAffinityRequestRouter(RequestRouter):
    def initialize_state(self, imbalance_threshold: int = 8, **kwargs: Any) -> None:
        self.imbalance_threshold = imbalance_threshold
        # adapter -> {replica_id: time of last request this router sent there}
        self._recent_routes: dict[str, dict[ReplicaID, float]] = {}

    def _load(self, replica: RunningReplica) -> int:
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        if queue_len is not None:
            return queue_len
        stats = RoutingStats.parse(replica.routing_stats)
        return stats.running + stats.waiting

    def _recently_sent(self, adapter: str, replica: RunningReplica, now: float) -> bool:
        sent = self._recent_routes.get(adapter, {}).get(replica.replica_id)
        return sent is not None and now - sent < RECENT_ROUTE_TTL_S

    def rank(self, candidates: list[RunningReplica], adapter: str) -> list[list[RunningReplica]]:
        """The tiers described in the module docstring (a function of state and chance:
        unit-tested). Within a tier Ray Serve takes the first of the replicas with the shortest
        queue. Tiers 1-2 keep the candidates' order, so equal holders keep getting an adapter
        on the same one (fewer slot loads); the last tier, where a new adapter or a base
        request lands, comes in random order with the replicas holding the fewest adapters
        first: equal queues (an idle fleet, sequential traffic) must not send everything new to
        the same replica."""
        shuffled = random.sample(candidates, len(candidates))
        if not adapter or not candidates:
            return [shuffled]
        everyone = sorted(shuffled, key=_adapters_held)  # stable: random among equals
        now = time.monotonic()
        floor = min(self._load(r) for r in candidates)
        within_bound = [r for r in candidates if self._load(r) <= floor + self.imbalance_threshold]
        on_accelerator, in_cpu = [], []
        for r in within_bound:
            stats = RoutingStats.parse(r.routing_stats)
            if adapter in stats.accelerator_adapters or self._recently_sent(adapter, r, now):
                on_accelerator.append(r)
            elif adapter in stats.cpu_adapters:
                in_cpu.append(r)
        return [tier for tier in (on_accelerator, in_cpu) if tier] + [everyone]

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        adapter = pending_request.metadata.multiplexed_model_id if pending_request else ""
        return self.rank(serving_replicas(candidate_replicas), adapter)

    def tier_of(self, adapter: str, replica: RunningReplica | None) -> str:
        """Where `replica` stood for `adapter` when it was chosen."""
        if not adapter:
            return "base"
        if replica is not None and self._recently_sent(adapter, replica, time.monotonic()):
            return "accelerator"
        stats = RoutingStats.parse(replica.routing_stats if replica is not None else {})
        if adapter in stats.accelerator_adapters:
            return "accelerator"
        return "cpu" if adapter in stats.cpu_adapters else "cold"

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result):
        adapter = pending_request.metadata.multiplexed_model_id
        metrics = _routing_metrics()
        if metrics is not None:
            try:
                replica = self.curr_replicas.get(replica_id)
            except AttributeError:  # a router made without Serve's state (unit tests)
                replica = None
            metrics.decisions.inc(1, tags={"tier": self.tier_of(adapter, replica)})
        if adapter:
            self._recent_routes.setdefault(adapter, {})[replica_id] = time.monotonic()

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._publish_routable()

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        for routes in self._recent_routes.values():
            routes.pop(replica_id, None)
        self._publish_routable()

    def _publish_routable(self) -> None:
        deployment = getattr(self, "_deployment_id", None)  # Ray's; no public accessor in 2.60
        if deployment is not None:
            publish_routable(deployment.name, len(self.curr_replicas))
