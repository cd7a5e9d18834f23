"""app/dispatch.py on its own: retries before Accepted, none after, bounded waits, the fleet
state. Replicas are test doubles here: the failures (a replica's engine refusing, its actor
dying before it answers) cannot be caused at an exact point of one request in the real app;
tests/faults/ kills real replicas under load and counts the outcomes."""

from __future__ import annotations

import asyncio
import time

import pytest
from ray.exceptions import ActorDiedError

from app.contract import Accepted, EngineUnavailable, ReplyHead, ReplyKind
from app.dispatch import FleetWatch, NoEngine, dispatch
from tests.unit.scripted_replies import HANG, ScriptedReplies


def replica(*items) -> ScriptedReplies:
    """One call's replies, in order."""
    return ScriptedReplies(items)


class Fleet:
    """Replicas in the order the router would pick them."""

    def __init__(self, *replicas: ScriptedReplies):
        self.replicas = list(replicas)
        self.used: list[ScriptedReplies] = []

    def call(self, endpoint, request, adapter):
        self.used.append(self.replicas.pop(0))
        return self.used[-1]


class FixedFleetState:
    def __init__(self, has_engine: bool):
        self.value = has_engine

    def has_engine(self) -> bool:
        return self.value

    def suspect(self) -> None:
        pass


def served(replica_id: str) -> ScriptedReplies:
    return replica(Accepted(replica_id), ReplyHead(ReplyKind.JSON, body=b"{}"))


def run(fleet, attempts=3, timeout=5.0, state=None):
    return asyncio.run(
        dispatch(
            fleet, "chat", object(), None, accept_timeout_s=timeout, attempts=attempts, fleet=state
        )
    )


@pytest.mark.parametrize(
    "failure", [EngineUnavailable("engine died"), ActorDiedError()], ids=["engine", "actor"]
)
def test_a_replica_that_cannot_serve_is_skipped(failure):
    dead, alive = replica(failure), served("r2")
    accepted, head, _ = run(Fleet(dead, alive))
    assert accepted.replica_id == "r2" and head.kind is ReplyKind.JSON
    assert dead.cancelled and not alive.cancelled


def test_attempts_are_bounded():
    fleet = Fleet(*(replica(EngineUnavailable("x")) for _ in range(5)))
    with pytest.raises(NoEngine):
        run(fleet, attempts=3)
    assert len(fleet.used) == 3


def test_no_retry_once_a_replica_took_the_request():
    # A request that crashes its engine must not be sent on to crash another.
    crashed = replica(Accepted("r1"), EngineUnavailable("died while serving"))
    fleet = Fleet(crashed, served("r2"))
    with pytest.raises(NoEngine):
        run(fleet)
    assert fleet.used == [crashed] and crashed.cancelled


def test_unexpected_failure_before_accepted_is_not_retried():
    broken = replica(RuntimeError("bug"))
    fleet = Fleet(broken, served("r2"))
    with pytest.raises(NoEngine):
        run(fleet)
    assert fleet.used == [broken] and broken.cancelled


def test_no_running_engine_is_a_fast_refusal():
    fleet = Fleet(served("r1"))
    with pytest.raises(NoEngine):
        run(fleet, state=FixedFleetState(False))
    assert fleet.used == []


def test_wait_is_cut_short_when_the_last_engine_goes_away():
    state = FixedFleetState(True)
    hung = replica(HANG)

    async def scenario():
        async def engines_vanish():
            await asyncio.sleep(0.3)
            state.value = False

        asyncio.get_running_loop().create_task(engines_vanish())
        t0 = time.monotonic()
        with pytest.raises(NoEngine):
            await dispatch(
                Fleet(hung), "chat", object(), None, accept_timeout_s=30, attempts=3, fleet=state
            )
        return time.monotonic() - t0

    waited = asyncio.run(scenario())
    assert 0.3 <= waited < 1.0 and hung.cancelled


def test_wait_is_bounded_by_the_accept_timeout():
    hung = replica(HANG)
    t0 = time.monotonic()
    with pytest.raises(NoEngine):
        run(Fleet(hung), timeout=0.4)
    assert time.monotonic() - t0 < 1.0 and hung.cancelled


def test_fleet_watch_looks_only_when_suspected_and_until_an_engine_is_back():
    answers = [False, False, True]
    looks = []

    async def readiness():
        looks.append(time.monotonic())
        return answers.pop(0), {}

    async def scenario():
        watch = FleetWatch(readiness, period_s=0.1)
        states = [watch.has_engine()]  # unknown yet: assumed available, nothing asked
        await asyncio.sleep(0.3)
        states.append(len(looks))  # a healthy-looking fleet is never polled
        watch.suspect()  # a request waits longer than usual
        await asyncio.sleep(0.02)
        states.append(watch.has_engine())  # none runs
        for _ in range(30):  # requests keep coming; it looks again once a period
            watch.has_engine()
            await asyncio.sleep(0.01)
        states.append(watch.has_engine())
        return states

    assert asyncio.run(scenario()) == [True, 0, False, True]
    assert len(looks) == 3 and min(b - a for a, b in zip(looks, looks[1:], strict=False)) >= 0.1


def test_fleet_watch_believes_the_router_and_asks_the_controller_only_without_it():
    looks = []

    async def readiness():
        looks.append(time.monotonic())
        return True, {}

    async def scenario():
        view = {"replicas": None}  # the request router's replica count; None: not known yet
        watch = FleetWatch(readiness, period_s=0.05, routable=lambda: view["replicas"])
        states = []
        for replicas in (2, 0, 1):
            view["replicas"] = replicas
            watch.suspect()  # requests wait (a flood): the router's view answers, no look
            states.append(watch.has_engine())
            await asyncio.sleep(0.06)
        states.append(len(looks))
        view["replicas"] = None  # e.g. Ray's default router: back to asking the controller
        watch.suspect()
        await asyncio.sleep(0.02)
        states.append(len(looks))
        return states

    assert asyncio.run(scenario()) == [True, False, True, 0, 1]


def test_a_refusal_names_the_replica_after_crossing_the_ray_hop():
    import pickle

    from ray.exceptions import RayTaskError

    crossed = pickle.loads(pickle.dumps(EngineUnavailable("replica-7")))
    wrapped = RayTaskError("chat", "traceback", crossed).as_instanceof_cause()
    assert isinstance(wrapped, EngineUnavailable)
    assert getattr(wrapped, "cause", wrapped).replica_id == "replica-7"
