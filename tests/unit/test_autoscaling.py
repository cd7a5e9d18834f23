"""The utilization autoscaling policy on hand-made contexts (Serve's AutoscalingContext fields)."""

from __future__ import annotations

from types import SimpleNamespace

from app.autoscaling import utilization_policy


def ctx(kv=None, running=None, waiting=None, queued=0.0, total=0.0, lo=1, hi=8):
    metrics = {
        "kv_cache_usage": kv or {},
        "running_requests": running or {},
        "waiting_requests": waiting or {},
    }
    return SimpleNamespace(
        aggregated_metrics=metrics,
        total_queued_requests=queued,
        total_num_requests=total,
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
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
