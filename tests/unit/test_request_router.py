"""The adapter-affinity tiers of AdapterAffinityRequestRouter, on stand-in replicas."""

from __future__ import annotations

from dataclasses import dataclass, field

from ray.serve._private.request_router.common import ReplicaQueueLengthCache

from app.contract import RoutingStats
from app.request_router import AdapterAffinityRequestRouter, serving_replicas


@dataclass(frozen=True)
class FakeReplica:  # the two attributes the ranking reads from a RunningReplica
    replica_id: str
    routing_stats: dict = field(default_factory=dict, hash=False, compare=False)


def make_router(threshold=2, queue_lens=None) -> AdapterAffinityRequestRouter:
    router = object.__new__(AdapterAffinityRequestRouter)  # no Ray controller needed for ranking
    router._replica_queue_len_cache = ReplicaQueueLengthCache()
    for rid, n in (queue_lens or {}).items():
        router._replica_queue_len_cache.update(rid, n)
    router.initialize_state(imbalance_threshold=threshold)
    return router


GPU = FakeReplica(
    "gpu", RoutingStats(accelerator_adapters=["a"], cpu_adapters=["a", "b"]).as_dict()
)
CPU = FakeReplica("cpu", RoutingStats(cpu_adapters=["a"]).as_dict())
COLD = FakeReplica("cold", {})
ALL = [COLD, CPU, GPU]


def ids(tiers):
    return [[r.replica_id for r in tier] for tier in tiers]


def test_accelerator_then_cpu_then_everyone():
    assert ids(make_router().rank(ALL, "a")) == [["gpu"], ["cpu"], ["cold", "cpu", "gpu"]]


def test_adapter_nowhere_or_base_model_goes_anywhere():
    assert ids(make_router().rank(ALL, "zzz")) == [["cold", "cpu", "gpu"]]  # fewest held first
    (base,) = ids(make_router().rank(ALL, ""))
    assert sorted(base) == ["cold", "cpu", "gpu"]


def test_equal_replicas_share_new_adapters_and_base_requests():
    """Ray Serve takes the first of equally loaded replicas: the order must not always be the
    same, or an idle fleet sends everything new to one replica."""
    twins = [FakeReplica("r1"), FakeReplica("r2")]
    router = make_router()
    for adapter in ("", "new-adapter"):
        firsts = [router.rank(twins, adapter)[-1][0].replica_id for _ in range(400)]
        assert 120 < firsts.count("r1") < 280, (adapter, firsts.count("r1"))


def test_load_bound_drops_an_overloaded_holder():
    router = make_router(threshold=2, queue_lens={"gpu": 5, "cpu": 1, "cold": 0})
    assert ids(router.rank(ALL, "a")) == [["cpu"], ["cold", "cpu", "gpu"]]


def test_recent_routes_count_as_resident_before_stats_arrive():
    router = make_router()

    class Pending:
        class metadata:
            multiplexed_model_id = "new"

    router.on_request_routed(Pending, "cold", None)
    assert ids(router.rank(ALL, "new")) == [["cold"], ["cold", "cpu", "gpu"]]


def test_replicas_whose_engine_failed_are_skipped():
    ok = FakeReplica("ok", RoutingStats().as_dict())
    dead = FakeReplica("dead", RoutingStats(serving=False).as_dict())
    assert serving_replicas([dead, ok, COLD]) == [ok, COLD]
    # Every replica failed: all of them, so the request is refused at once instead of waiting.
    assert serving_replicas([dead]) == [dead]


def test_each_decision_is_classified_by_the_tier_of_the_chosen_replica():
    router = make_router()
    assert [router.tier_of("a", r) for r in (GPU, CPU, COLD)] == ["accelerator", "cpu", "cold"]
    assert router.tier_of("", COLD) == "base" and router.tier_of("a", None) == "cold"

    class Pending:
        class metadata:
            multiplexed_model_id = "a"

    router.on_request_routed(Pending, "cold", None)  # sent there: resident from now on
    assert router.tier_of("a", COLD) == "accelerator"


SHIPPED_ROUTER_SCENARIO = """
import asyncio, pickle, sys
from dataclasses import dataclass
from ray.serve._private.common import DeploymentHandleSource, DeploymentID
from app.dispatch import routable_replicas

shipped = pickle.loads(sys.stdin.buffer.read())  # cloudpickle's output: plain pickle loads it

@dataclass(frozen=True)
class PushedReplica:  # what update_replicas and its queue probe read
    replica_id: str
    node_id: str = "node"
    availability_zone: str | None = None
    multiplexed_model_ids: frozenset = frozenset()
    routing_stats: dict | None = None

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0

async def scenario():
    router = shipped(DeploymentID(name="Engine", app_name="a"), DeploymentHandleSource.UNKNOWN)
    router.initialize_state()
    seen = [routable_replicas("Engine")]  # not heard from the controller yet
    r1, r2 = PushedReplica("r1"), PushedReplica("r2")
    router.update_replicas([r1, r2])
    seen.append(routable_replicas("Engine"))
    router.on_replica_actor_died(r1.replica_id)  # Ray's router drops a dead actor at once
    seen.append(routable_replicas("Engine"))
    router.update_replicas([])
    seen.append(routable_replicas("Engine"))
    await asyncio.sleep(0)  # let the queue probes Serve starts run
    print(seen)

asyncio.run(scenario())
"""


def test_routers_tell_their_process_how_many_replicas_they_can_reach():
    """The ingress answers "does any engine replica run?" from this (app/dispatch.py
    FleetWatch) instead of asking the controller, so it must follow the replica set Serve
    pushes, with the router class as Serve ships it to the ingress: pickled by value, loaded in
    a process that never imported it (its module's globals are then a private copy)."""
    import subprocess
    import sys

    from ray.serve.config import RequestRouterConfig

    shipped = RequestRouterConfig(
        request_router_class="app.request_router:AdapterAffinityRequestRouter"
    ).get_serialized_request_router_cls()
    out = subprocess.run(
        [sys.executable, "-c", SHIPPED_ROUTER_SCENARIO],
        input=shipped,
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.decode().strip().splitlines()[-1] == "[None, 2, 1, 0]"
