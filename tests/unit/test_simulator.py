"""The fleet simulator (loadtest/simulator/): traffic replay, one replica's scheduler and LoRA
caches against hand-computed times and counts, the routers against the app's own ranking, the
autoscaler's delays, and the replay of the routing experiment. No Ray is started; fast."""

from __future__ import annotations

import random
import time

import pytest

from benchmarks.routing.experiment import schedule
from loadtest.simulator.autoscale import AutoscaleConfig, Autoscaler
from loadtest.simulator.fleet import Fleet
from loadtest.simulator.params import (
    EngineParams,
    FleetParams,
    Scenario,
    StepTime,
    cpu_builtin,
    prompt_tokens,
)
from loadtest.simulator.replica import Replica
from loadtest.simulator.routers import (
    AdapterAffinityRouter,
    MultiplexRouter,
    PowerOfTwoRouter,
)
from loadtest.simulator.summary import summarize, weighted_percentile
from loadtest.simulator.traffic import Request, Workload, generate, routing_experiment_traffic


def engine(**kw) -> EngineParams:
    base = dict(
        step=StepTime(fixed_s=0.010, per_seq_s=0.001, per_token_s=0.0001),
        max_num_seqs=4, max_loras=2, max_cpu_loras=3, max_num_batched_tokens=1000,
        disk_load_s=0.5, slot_load_s=0.05, kv_capacity_tokens=10_000, overhead_s=0.0,
    )  # fmt: skip
    return EngineParams(**(base | kw))


def run_one_replica(requests, **kw):
    fleet = Fleet(Scenario(engine(**kw)), "ours", 1)
    return fleet.run(requests)


# ---- traffic --------------------------------------------------------------------------------


def test_routing_experiment_traffic_is_the_experiments_own():
    real = schedule(90.0, 2.0)
    sim = routing_experiment_traffic()
    assert len(sim) == len(real) == 144
    for a, r in zip(real, sim, strict=True):
        assert r.arrival == a.at_s
        assert r.adapter == int(a.tenant.removeprefix("rt-t")) - 1
        assert r.output == a.max_tokens
        assert r.prompt == prompt_tokens(len(a.prompt.split()))


def test_generated_traffic_is_deterministic_and_zipf_shaped():
    a = generate(Workload(tenants=100), "poisson:50", 60, seed=3)
    b = generate(Workload(tenants=100), "poisson:50", 60, seed=3)
    assert [(r.arrival, r.adapter, r.prompt, r.output) for r in a] == [
        (r.arrival, r.adapter, r.prompt, r.output) for r in b
    ]
    assert 2700 < len(a) < 3300
    top = sum(r.adapter == 0 for r in a) / len(a)
    assert 0.15 < top < 0.25  # Zipf(1.1) over 100: rank 1 has 19%
    ramp = generate(Workload(), "ramp:100:30", 60, seed=3)
    first, last = (sum(lo <= r.arrival < lo + 10 for r in ramp) for lo in (0, 50))
    assert first < last / 3  # the ramp starts near 0


# ---- one replica ------------------------------------------------------------------------------


def test_one_request_alone_takes_a_prefill_step_then_decode_steps():
    req = Request(0, 1.0, adapter=0, prompt=100, output=5)
    run_one_replica([req])
    load = 0.5 + 0.05  # registration: from disk, into a slot
    prefill = 0.010 + 0.0001 * 100
    decode = 0.010 + 0.001 + 0.0001
    assert req.first_token == pytest.approx(1.0 + load + prefill)
    assert req.done == pytest.approx(req.first_token + 4 * decode)


def test_a_request_joins_a_running_batch_at_the_next_step_boundary():
    first = Request(0, 0.0, adapter=0, prompt=10, output=100)
    second = Request(1, 1.0, adapter=0, prompt=10, output=3)
    run_one_replica([first, second])
    load = 0.55
    t0 = load + 0.010 + 0.001  # first's prefill step
    decode = 0.010 + 0.001 + 0.0001
    steps_before = -(-(1.0 - t0) // decode)  # the step running at 1.0 finishes first
    boundary = t0 + steps_before * decode
    joint_step = 0.010 + 0.001 + 0.0001 * (1 + 10)  # first decodes, second prefills
    assert second.first_token == pytest.approx(boundary + joint_step)


def test_max_loras_keeps_a_third_adapter_waiting_and_slots_are_lru():
    reqs = [Request(i, 0.0, adapter=i, prompt=10, output=20) for i in range(3)]
    result = run_one_replica(reqs)
    a, b, c = reqs
    assert c.first_token > max(a.done, b.done) - 1e-9  # only 2 adapters per batch
    replica = result.replicas[0]
    assert replica.disk_loads == 3
    # Registering 1 and 2 activates them (vLLM's add_lora does), which pushes 0 out of the two
    # slots while it runs; the next step puts 0 and 1 back; 2 comes back when it is admitted.
    assert replica.slot_loads == 6


def test_cpu_cache_evicts_the_least_recently_used_adapter():
    replica = Replica(0, engine(max_cpu_loras=2, max_loras=1))
    for adapter in (0, 1, 0, 2, 1):  # 1 is evicted by 2 (0 was touched), then read again
        replica._load(adapter)
    assert replica.disk_loads == 4
    assert list(replica.cpu_lru) == [2, 1]
    assert replica.slot_loads == 5  # one slot: every change of adapter is a slot load


def test_itl_percentiles_are_per_token():
    assert weighted_percentile(*map(__import__("numpy").array, ([1.0, 9.0], [99, 1])), 50) == 1.0


# ---- routers --------------------------------------------------------------------------------

FLEET = FleetParams(imbalance_threshold=2)


def replicas_with(states):
    """states: (ongoing, accelerator adapters, cpu adapters) per replica."""
    out = []
    for i, (ongoing, accel, cpu) in enumerate(states):
        r = Replica(i, engine())
        r.ongoing = ongoing
        r.published = (frozenset(accel), frozenset(cpu))
        out.append(r)
    return out


def fakes_ids(tier) -> list[str]:
    return [r.replica_id for r in tier]


def test_our_tiers_match_the_apps_router_on_random_states():
    pytest.importorskip("ray")
    from ray.serve._private.request_router.common import ReplicaQueueLengthCache

    from app.contract import RoutingStats
    from app.request_router import AdapterAffinityRequestRouter
    from tests.unit.test_request_router import FakeReplica

    rng = random.Random(5)
    for _ in range(200):
        n = rng.randint(1, 5)
        states = [
            (rng.randint(0, 6), set(rng.sample(range(4), rng.randint(0, 2))),
             set(rng.sample(range(4), rng.randint(0, 3))))
            for _ in range(n)
        ]  # fmt: skip
        recent = {i: rng.choice([None, 5.0, 40.0]) for i in range(n)}  # seconds ago
        sim_replicas = replicas_with(states)
        sim = AdapterAffinityRouter(FLEET, random.Random(0))
        sim.recent_routes[1] = {i: 100.0 - age for i, age in recent.items() if age is not None}

        app = object.__new__(AdapterAffinityRequestRouter)
        app._replica_queue_len_cache = ReplicaQueueLengthCache()
        app.initialize_state(imbalance_threshold=2)
        fakes = []
        for i, (ongoing, accel, cpu) in enumerate(states):
            stats = RoutingStats(accelerator_adapters=[str(a) for a in accel],
                                 cpu_adapters=[str(a) for a in cpu])  # fmt: skip
            fakes.append(FakeReplica(str(i), stats.as_dict()))
            app._replica_queue_len_cache.update(str(i), ongoing)
        now = time.monotonic()
        app._recent_routes["1"] = {
            str(i): now - age for i, age in recent.items() if age is not None
        }
        app_tiers = app.rank(fakes, "1")
        sim_tiers = sim.rank(Request(0, 0, 1, 1, 1), sim_replicas, 100.0)
        # Same tiers: 1-2 in replica order, the last by adapters held (ties random).
        want = [[int(r.replica_id) for r in tier] for tier in app_tiers[:-1]]
        got = [[r.idx for r in tier] for tier in sim_tiers[:-1]]
        assert got == want
        assert sorted(r.idx for r in sim_tiers[-1]) == sorted(map(int, fakes_ids(app_tiers[-1])))
        held = [len(states[int(r.replica_id)][1] | states[int(r.replica_id)][2])
                for r in app_tiers[-1]]  # fmt: skip
        assert held == sorted(held)
        assert [len(states[r.idx][1] | states[r.idx][2]) for r in sim_tiers[-1]] == held


def test_our_router_takes_the_shortest_queue_of_the_first_tier():
    replicas = replicas_with([(0, (), ()), (2, (), (7,)), (1, (7,), ())])
    router = AdapterAffinityRouter(FLEET, random.Random(0))
    assert router.choose(Request(0, 0, 7, 1, 1), replicas, 0.0).idx == 2
    replicas[2].ongoing = 3  # beyond the bound (0 + 2): the CPU tier
    assert router.choose(Request(0, 0, 7, 1, 1), replicas, 0.0).idx == 1


def test_power_of_two_picks_the_shorter_of_two():
    replicas = replicas_with([(5, (), ()), (1, (), ())])
    router = PowerOfTwoRouter(FLEET, random.Random(0))
    assert all(router.choose(Request(0, 0, 0, 1, 1), replicas, 0.0).idx == 1 for _ in range(20))


def test_multiplex_prefers_replicas_reporting_the_id_then_the_fewest():
    replicas = replicas_with([(0, (), ()), (9, (), ()), (0, (), ())])
    for adapter in (1, 2):
        replicas[0].note_multiplexed(adapter, 0.0, capacity=8, lag_s=0.1)
    replicas[1].note_multiplexed(3, 0.0, capacity=8, lag_s=0.1)
    router = MultiplexRouter(FLEET, random.Random(0))
    assert router.choose(Request(0, 0, 3, 1, 1), replicas, 0.05).idx == 2  # not seen yet: 0 ids
    assert router.choose(Request(0, 0, 3, 1, 1), replicas, 1.0).idx == 1  # reports 3
    assert router.choose(Request(0, 0, 5, 1, 1), replicas, 1.0).idx == 2  # fewest ids (0)


# ---- autoscaling ----------------------------------------------------------------------------


def test_autoscaler_waits_for_the_upscale_delay_and_keeps_a_headroom_band():
    cfg = AutoscaleConfig(upscale_delay_s=10, downscale_delay_s=20, look_back_s=1,
                          target_requests_per_replica=10)  # fmt: skip
    scaler = Autoscaler(cfg)
    busy = replicas_with([(25, (), ())])
    for t in range(11):
        scaler.sample(busy, float(t))
        target = scaler.decide(busy, 0, 1, float(t))
        assert target == (3 if t >= 10 else 1)
    three = replicas_with([(8, (), ()), (8, (), ()), (7, (), ())])  # load 2.3: above 2 x 0.8
    for t in range(11, 50):
        scaler.sample(three, float(t))
        assert scaler.decide(three, 0, 3, float(t)) == 3


# ---- the routing experiment replayed -----------------------------------------------------------


def test_routing_experiment_replay_reproduces_the_measured_load_counts():
    """Ours with the fitted slowdown (loadtest/results/simulator_validation_*.json):
    measured 16-17 disk loads, 33-34 slot loads, 8 / 8 or 7 / 9 adapters per replica. (The
    measurement predates the router's tie rule for new adapters, fewest held first: with it
    the replay gives 38 slot loads instead of 32.)"""
    scenario = Scenario(cpu_builtin(1.876), FleetParams(max_ongoing_requests=64))
    result = Fleet(scenario, "ours", 2).run(routing_experiment_traffic())
    s = summarize(result)
    assert s["completed"] == 144
    assert 15 <= s["disk_loads"] <= 18 and 30 <= s["slot_loads"] <= 40
    assert sorted(s["distinct_adapters_per_replica"]) in ([8, 8], [7, 9])
    assert s["ttft_p50_s"] == pytest.approx(0.227, rel=0.15)
    default = summarize(Fleet(scenario, "ray_default", 2, seed=1).run(routing_experiment_traffic()))
    assert default["disk_loads"] > 1.6 * s["disk_loads"]  # measured 37-38


def test_same_seed_same_result():
    def once():
        reqs = generate(Workload(tenants=50), "poisson:20", 20, seed=2)
        return summarize(Fleet(Scenario(cpu_builtin()), "ray_default", 3, seed=4).run(reqs))

    assert once() == once()
