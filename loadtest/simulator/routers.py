"""The three request routers, as the simulator runs them. Each returns a replica for a request,
or None when every candidate's queue is full (the request then waits at the handle).

Queue lengths are what Ray's routers read from their queue-length cache: incremented when a
request is sent, decremented when it ends, i.e. the replica's ongoing requests (exact here; one
router, the single ingress replica's). Within a tier Ray takes the shortest queue, ties to the
first candidate in its list (ours orders its tiers for that, as app/request_router.py does).
"""

from __future__ import annotations

import random

from loadtest.simulator.params import FleetParams
from loadtest.simulator.replica import Replica
from loadtest.simulator.traffic import Request


class Router:
    name = "base"

    def __init__(self, fleet: FleetParams, rng: random.Random):
        self.fleet = fleet
        self.rng = rng

    def choose(self, req: Request, replicas: list[Replica], now: float) -> Replica | None:
        raise NotImplementedError

    def routed(self, req: Request, replica: Replica, now: float) -> None:
        pass

    def _shortest_with_room(self, tier: list[Replica]) -> Replica | None:
        best = None
        for r in tier:
            if r.ongoing < self.fleet.max_ongoing_requests and (
                best is None or r.ongoing < best.ongoing
            ):
                best = r
        return best


def _adapters_held(replica: Replica) -> int:
    accel, cpu = replica.published
    return len(set(accel) | set(cpu))


class AdapterAffinityRouter(Router):
    """app/request_router.py AdapterAffinityRequestRouter.rank(): tiers (1) the adapter in a
    slot by the replica's last published stats, or sent there by this router within
    RECENT_ROUTE_TTL_S, (2) in the replica's CPU cache by its stats, (3) every replica; tiers
    1-2 only among replicas whose queue is at most `imbalance_threshold` above the shortest.
    Stats are the snapshot each replica published last (every `stats_period_s`)."""

    name = "ours"

    def __init__(self, fleet: FleetParams, rng: random.Random):
        super().__init__(fleet, rng)
        self.recent_routes: dict[int, dict[int, float]] = {}
        self.tiers = {"accelerator": 0, "cpu": 0, "cold": 0}

    def rank(self, req: Request, replicas: list[Replica], now: float) -> list[list[Replica]]:
        # As the app: tiers 1-2 in replica order (Ray takes the first of equal queues), the
        # last one in random order with the replicas holding the fewest adapters first.
        everyone = sorted(self.rng.sample(replicas, len(replicas)), key=_adapters_held)
        floor = min(r.ongoing for r in replicas)
        bound = floor + self.fleet.imbalance_threshold
        sent = self.recent_routes.get(req.adapter, {})
        ttl = self.fleet.recent_route_ttl_s
        on_accelerator, in_cpu = [], []
        for r in replicas:
            if r.ongoing > bound:
                continue
            accel, cpu = r.published
            if req.adapter in accel or now - sent.get(r.idx, -ttl) < ttl:
                on_accelerator.append(r)
            elif req.adapter in cpu:
                in_cpu.append(r)
        return [tier for tier in (on_accelerator, in_cpu) if tier] + [everyone]

    def choose(self, req: Request, replicas: list[Replica], now: float) -> Replica | None:
        for tier in self.rank(req, replicas, now):
            chosen = self._shortest_with_room(tier)
            if chosen is not None:
                return chosen
        return None

    def routed(self, req: Request, replica: Replica, now: float) -> None:
        accel, cpu = replica.published
        sent = self.recent_routes.setdefault(req.adapter, {})
        recent = now - sent.get(replica.idx, -self.fleet.recent_route_ttl_s)
        if req.adapter in accel or recent < self.fleet.recent_route_ttl_s:
            req.tier = "accelerator"
        else:
            req.tier = "cpu" if req.adapter in cpu else "cold"
        self.tiers[req.tier] += 1
        sent[replica.idx] = now


class PowerOfTwoRouter(Router):
    """Ray Serve's PowerOfTwoChoicesRequestRouter with no multiplexed ids reported (what the
    app's `routing.router: ray_default` gets): two distinct random candidates, the shorter queue
    (a tie to the first drawn). Both full: Ray retries with backoff; here, more random pairs,
    then a full scan."""

    name = "ray_default"

    def choose(self, req: Request, replicas: list[Replica], now: float) -> Replica | None:
        return self._pow2(replicas)

    def _pair(self, candidates: list[Replica]) -> list[Replica]:
        n = len(candidates)
        if n == 1:
            return [candidates[0]]
        i = self.rng.randrange(n)
        j = self.rng.randrange(n - 1)
        return [candidates[i], candidates[j + (j >= i)]]

    def _pow2(self, candidates: list[Replica]) -> Replica | None:
        for _ in range(3):
            chosen = self._shortest_with_room(self._pair(candidates))
            if chosen is not None:
                return chosen
        return self._shortest_with_room(candidates)


class MultiplexRouter(PowerOfTwoRouter):
    """Ray's multiplexing affinity (MultiplexMixin.apply_multiplex_routing) with replicas that
    report the last `multiplex_models_per_replica` adapters requested on them (the routing
    experiment's benchmark-only engine subclass): power of two choices among the replicas that
    report the adapter; none, or those full: among the replicas reporting the fewest ids; then
    every replica."""

    name = "ray_multiplex"

    def choose(self, req: Request, replicas: list[Replica], now: float) -> Replica | None:
        holding = [r for r in replicas if req.adapter in r.multiplexed_ids(now)]
        if holding:  # one try among them; if that pair is full Ray moves on to "fewest"
            chosen = self._shortest_with_room(self._pair(holding))
            if chosen is not None:
                return chosen
        fewest = min(len(r.multiplexed_ids(now)) for r in replicas)
        chosen = self._pow2([r for r in replicas if len(r.multiplexed_ids(now)) == fewest])
        return chosen if chosen is not None else self._shortest_with_room(replicas)


ROUTERS = {cls.name: cls for cls in (AdapterAffinityRouter, PowerOfTwoRouter, MultiplexRouter)}
