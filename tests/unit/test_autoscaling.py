"""The utilization autoscaling policy on hand-made contexts (Serve's AutoscalingContext fields)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from app.autoscaling import UtilizationPolicy
from app.contract import AutoscalingStat

utilization_policy = UtilizationPolicy()  # the defaults: 0.7 KV use, 32 requests per replica


def ctx(kv=None, running=None, waiting=None, queued=0.0, total=0.0, lo=1, hi=8, current=None):
    metrics = {
        AutoscalingStat.KV_CACHE_USAGE.value: kv or {},
        AutoscalingStat.RUNNING_REQUESTS.value: running or {},
        AutoscalingStat.WAITING_REQUESTS.value: waiting or {},
    }
    return SimpleNamespace(
        aggregated_metrics=metrics,
        total_queued_requests=queued,
        total_num_requests=total,
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        current_num_replicas=len(set(kv or {}) | set(running or {}))
        if current is None
        else current,
        policy_state={},
        deployment_name="Engine",
    )


def test_kv_cache_pressure_scales_up_even_with_few_requests():
    n, _ = utilization_policy(ctx(kv={"a": 0.95, "b": 0.9}, running={"a": 3, "b": 2}))
    assert n == 3  # 0.95/0.7 + 0.9/0.7 = 2.64


def test_many_short_requests_scale_on_queue():
    n, _ = utilization_policy(ctx(kv={"a": 0.1}, running={"a": 32}, waiting={"a": 40}, queued=30))
    assert n == 4  # (32 + 40 + 30) / 32 = 3.19


def test_idle_scales_down_to_min_and_respects_max():
    assert utilization_policy(ctx(kv={"a": 0.0, "b": 0.0}))[0] == 1
    assert utilization_policy(ctx(kv={r: 1.0 for r in "abcdefgh"}, hi=8))[0] == 8


def test_falls_back_to_request_count_before_stats_arrive():
    assert utilization_policy(ctx(total=100.0))[0] == 4


def test_hysteresis_scales_down_only_below_the_headroom():
    # 3 replicas, load 1.9: two would be 95% loaded, above the 80% headroom: stay at 3.
    running = {"a": 20.8, "b": 20.8, "c": 19.2}  # 60.8 / 32 = 1.9
    assert utilization_policy(ctx(running=running))[0] == 3
    # load 1.5: two replicas at 75% each: go down to 2 (never below ceil(load)).
    running = {"a": 16.0, "b": 16.0, "c": 16.0}
    assert utilization_policy(ctx(running=running))[0] == 2
    # Scaling up has no band: load 2.1 on 2 replicas wants 3 at once.
    assert utilization_policy(ctx(running={"a": 33.6, "b": 33.6}))[0] == 3


def test_policy_kwargs_reach_the_policy():
    """Ray Serve gives `policy_kwargs` to a class's constructor only (a plain function silently
    ran with its defaults: a live test never scaled)."""
    assert UtilizationPolicy(target_requests_per_replica=2)(ctx(running={"a": 7.0}))[0] == 4
    assert utilization_policy(ctx(running={"a": 7.0}))[0] == 1


def test_a_change_of_the_wanted_count_is_logged_with_its_inputs():
    c = ctx(running={"a": 64.0}, waiting={"a": 32.0}, current=1)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    serve_logger = logging.getLogger("ray.serve")  # where Serve's controller log comes from
    level = serve_logger.level
    serve_logger.addHandler(handler)
    serve_logger.setLevel(logging.INFO)
    try:
        policy = UtilizationPolicy()
        n, state = policy(c)
        c.policy_state = state
        policy(c)  # same decision: not logged again
    finally:
        serve_logger.removeHandler(handler)
        serve_logger.setLevel(level)
    assert n == 3 and state["wanted"] == 3
    lines = [r.getMessage() for r in records if "autoscaling" in r.getMessage()]
    assert len(lines) == 1 and "want 3 replicas (now 1)" in lines[0] and "load 3.00" in lines[0]


def test_scale_to_zero_when_allowed_and_back_up_from_queued_requests():
    assert utilization_policy(ctx(kv={"a": 0.0}, lo=0))[0] == 0
    assert utilization_policy(ctx(queued=3.0, lo=0, current=0))[0] == 1
