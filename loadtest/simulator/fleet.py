"""The event loop: arrivals go through a router to replicas; replicas run segments of steps;
routing stats are published periodically; the autoscaler (optional) adds and drains replicas.
A request that finds every queue full waits at the handle (FIFO) until a request ends."""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

from loadtest.simulator.autoscale import AutoscaleConfig, Autoscaler
from loadtest.simulator.params import Scenario
from loadtest.simulator.replica import Replica
from loadtest.simulator.routers import ROUTERS, Router
from loadtest.simulator.traffic import Request

ARRIVAL, SEGMENT_END, STATS, CONTROL, READY = range(5)


@dataclass
class RunResult:
    requests: list[Request]
    replicas: list[Replica]
    router: Router
    itl: list[tuple[float, int]]
    overhead_s: float
    end_s: float
    aborted: bool = False
    replica_timeline: list[tuple[float, int]] = field(default_factory=list)  # (t, serving)


class Fleet:
    def __init__(
        self,
        scenario: Scenario,
        router: str,
        replicas: int,
        seed: int = 0,
        autoscale: AutoscaleConfig | None = None,
    ):
        self.scenario = scenario
        self.engine = scenario.engine
        self.fp = scenario.fleet
        self.router = ROUTERS[router](self.fp, random.Random(seed))
        self.autoscaler = Autoscaler(autoscale) if autoscale else None
        n0 = autoscale.initial_replicas if autoscale else replicas
        self.replicas = [Replica(i, self.engine) for i in range(n0)]
        self.target = n0
        self.events: list[tuple[float, int, int, int, object]] = []
        self._seq = 0
        self.handle_queue: deque[Request] = deque()
        self.itl: list[tuple[float, int]] = []
        self.timeline: list[tuple[float, int]] = [(0.0, n0)]
        self._serving: list[Replica] | None = None

    def _push(self, t: float, kind: int, key: int = 0, payload: object = None) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, key, payload))

    def serving(self) -> list[Replica]:
        if self._serving is None:  # recomputed only after a replica changed state
            self._serving = [r for r in self.replicas if r.state == "serving"]
        return self._serving

    # ---- requests ---------------------------------------------------------------------------

    def _route(self, req: Request, now: float) -> bool:
        candidates = self.serving()
        if not candidates:
            return False
        replica = self.router.choose(req, candidates, now)
        if replica is None:
            return False
        self.router.routed(req, replica, now)
        replica.ongoing += 1
        replica.note_multiplexed(
            req.adapter, now, self.fp.multiplex_models_per_replica, self.fp.multiplex_report_lag_s
        )
        end = replica.enqueue(req, now)
        if end is not None:
            self._push(end, SEGMENT_END, replica.idx, replica.version)
        return True

    def _drain_handle_queue(self, now: float) -> None:
        while self.handle_queue and self._route(self.handle_queue[0], now):
            self.handle_queue.popleft()

    def _segment_end(self, replica: Replica, now: float) -> None:
        finished = replica.end_segment(self.itl)
        end = replica.start_segment(now)
        if end is not None:
            self._push(end, SEGMENT_END, replica.idx, replica.version)
        if finished:
            if replica.state == "draining" and replica.ongoing == 0:
                replica.state, replica.stopped_at = "stopped", now
                self._record_count(now)
            self._drain_handle_queue(now)

    # ---- scaling ----------------------------------------------------------------------------

    def _record_count(self, now: float) -> None:
        self._serving = None
        self.timeline.append((now, sum(r.state in ("serving", "draining") for r in self.replicas)))

    def _control(self, now: float) -> None:
        live = [r for r in self.replicas if r.state in ("serving", "draining")]
        self.autoscaler.sample(live, now)
        new = self.autoscaler.decide(live, len(self.handle_queue), self.target, now)
        if new > self.target:
            for _ in range(new - self.target):
                r = Replica(len(self.replicas), self.engine, ready_at=now + self.fp.replica_start_s)
                self.replicas.append(r)
                self._push(r.ready_at, READY, r.idx)
        elif new < self.target:
            # newest first: those still starting, then serving ones
            active = [r for r in self.replicas if r.state in ("starting", "serving")]
            for r in sorted(active, key=lambda r: -r.idx)[: self.target - new]:
                if r.state == "starting" or r.ongoing == 0:
                    r.state, r.stopped_at = "stopped", now
                else:
                    r.state = "draining"
            self._record_count(now)
        self.target = new

    # ---- the loop ---------------------------------------------------------------------------

    def run(
        self,
        requests: list[Request],
        until_s: float | None = None,
        abort_ttft_s: float | None = None,
        abort_after: int = 0,
        abort_count_from_s: float = 0.0,
    ) -> RunResult:
        """Run to the end of the traffic and its drain (or `until_s`). With `abort_ttft_s`, stop
        early once `abort_after` requests have waited longer than that for their first token
        (with `abort_after` above 1% of the measured requests, those arriving after
        `abort_count_from_s`, their p99 SLO is already missed; checked every 100th arrival)."""
        for req in requests:
            self._push(req.arrival, ARRIVAL, 0, req)
        horizon = until_s if until_s is not None else math.inf
        self._push(0.0, STATS)
        if self.autoscaler:
            self._push(0.0, CONTROL)
        pending = len(requests)
        now = 0.0
        aborted = False
        while self.events:
            now, _, kind, key, payload = heapq.heappop(self.events)
            if now > horizon:
                break
            if kind == ARRIVAL:
                if not self._route(payload, now):
                    self.handle_queue.append(payload)
            elif kind == SEGMENT_END:
                replica = self.replicas[key]
                if payload != replica.version or not replica.busy:
                    continue
                before = replica.served
                self._segment_end(replica, now)
                pending -= replica.served - before
                if pending == 0:
                    break
            elif kind == STATS:
                for r in self.replicas:
                    r.publish_stats()
                if pending:
                    self._push(now + self.fp.stats_period_s, STATS)
            elif kind == CONTROL:
                self._control(now)
                if pending:
                    self._push(now + self.autoscaler.cfg.period_s, CONTROL)
            elif kind == READY:
                replica = self.replicas[key]
                if replica.state == "starting":
                    replica.state = "serving"
                    replica.publish_stats()
                    self._record_count(now)
                    self._drain_handle_queue(now)
            if abort_ttft_s is not None and kind == ARRIVAL and payload.rid % 100 == 0:
                # TTFT adds the request path outside the engine
                limit = abort_ttft_s - self.engine.overhead_s
                if self._count_slow(now, limit, abort_count_from_s) >= abort_after > 0:
                    aborted = True
                    break
        return RunResult(
            requests, self.replicas, self.router, self.itl, self.engine.overhead_s, now,
            aborted, self.timeline,
        )  # fmt: skip

    def _count_slow(self, now: float, limit: float, since: float) -> int:
        """Requests that arrived after `since` and are already past `limit` without a first
        token, queued at the handle or at a replica (both FIFO: the oldest come first)."""
        slow = 0
        for q in [self.handle_queue] + [r.waiting for r in self.replicas]:
            for req in q:
                if now - req.arrival <= limit:
                    break
                slow += req.arrival >= since
        return slow
