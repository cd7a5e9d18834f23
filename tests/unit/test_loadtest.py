"""The load test's parts that need no server: Zipf sampling, length distributions, the shapes'
schedules, the Poisson clock, the request record, and the report's aggregation from a small
synthetic requests.csv (loadtest/workload.py, loadtest/report.py)."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter

import pytest

from loadtest import report as rep
from loadtest.workload import (
    FIELDS,
    LengthDist,
    PoissonClock,
    RequestRecord,
    Shape,
    Stage,
    ZipfSampler,
    read_records,
    tenant_names,
    zipf_weights,
)

# ---- Zipf ---------------------------------------------------------------------------------------


def test_zipf_weights_follow_the_power_law():
    w = zipf_weights(4, 1.0)
    h = 1 + 1 / 2 + 1 / 3 + 1 / 4
    assert w == pytest.approx([1 / h, 1 / 2 / h, 1 / 3 / h, 1 / 4 / h])
    assert zipf_weights(5, 0.0) == pytest.approx([0.2] * 5)
    w2 = zipf_weights(10, 2.0)
    assert w2[0] / w2[1] == pytest.approx(4.0) and w2[0] / w2[9] == pytest.approx(100.0)
    with pytest.raises(ValueError):
        zipf_weights(0, 1.0)
    with pytest.raises(ValueError):
        zipf_weights(3, -0.5)


@pytest.mark.parametrize("n,s", [(16, 1.1), (8, 0.0), (5, 2.0)])
def test_zipf_sampler_frequencies_match(n, s):
    draws = 40_000
    sampler = ZipfSampler(n, s, random.Random(7))
    counts = Counter(sampler() for _ in range(draws))
    assert set(counts) <= set(range(n))
    for rank, p in enumerate(zipf_weights(n, s)):
        sd = (p * (1 - p) / draws) ** 0.5
        assert abs(counts[rank] / draws - p) < 5 * sd + 1e-4, (rank, counts[rank] / draws, p)


def test_zipf_sampler_is_deterministic_per_seed():
    a = ZipfSampler(16, 1.1, random.Random(3))
    b = ZipfSampler(16, 1.1, random.Random(3))
    c = ZipfSampler(16, 1.1, random.Random(4))
    seq_a, seq_b, seq_c = ([s() for _ in range(200)] for s in (a, b, c))
    assert seq_a == seq_b and seq_a != seq_c


def test_tenant_names_by_rank_are_valid_registry_names():
    import re

    from app.config import NAME_PATTERN

    names = tenant_names("2611300135", 120)
    assert names[0] == "lt-2611300135-t001" and names[-1] == "lt-2611300135-t120"
    assert len(set(names)) == 120 and all(re.match(NAME_PATTERN, n) for n in names)


# ---- lengths ------------------------------------------------------------------------------------


def test_length_distributions():
    rng = random.Random(1)
    assert {LengthDist.parse("fixed:32").sample(rng) for _ in range(20)} == {32}
    u = [LengthDist.parse("uniform:10:20").sample(rng) for _ in range(2000)]
    assert min(u) == 10 and max(u) == 20 and 14 < sum(u) / len(u) < 16
    ln = [LengthDist.parse("lognormal:48:0.5:100").sample(rng) for _ in range(4000)]
    assert max(ln) == 100 and min(ln) >= 1
    assert 44 <= sorted(ln)[len(ln) // 2] <= 52  # the median
    ex = [LengthDist.parse("exponential:30").sample(rng) for _ in range(4000)]
    assert 27 < sum(ex) / len(ex) < 33 and min(ex) >= 1


@pytest.mark.parametrize(
    "spec",
    ["", "fixed", "fixed:0", "uniform:5", "uniform:9:3", "gamma:2", "fixed:x", "lognormal:1"],
)
def test_bad_length_specs_are_refused(spec):
    with pytest.raises(ValueError):
        LengthDist.parse(spec)


# ---- shapes -------------------------------------------------------------------------------------


def test_constant_shape():
    s = Shape.parse("constant:users=6,duration=120")
    assert s.plan(0) == Stage(6, 6) and s.plan(119.9) == Stage(6, 6)
    assert s.plan(120) is None
    assert (
        Shape.parse("constant").plan(0) == Stage(8, 8) and Shape.parse("constant").duration == 300
    )


def test_step_shape_schedule():
    s = Shape.parse("step:start=2,step=3,every=30,max=10,duration=200,spawn_rate=1")
    assert [s.plan(t).users for t in (0, 29.9, 30, 59, 60, 90, 150, 199)] == [
        2,
        2,
        5,
        5,
        8,
        10,
        10,
        10,
    ]
    assert s.plan(0).spawn_rate == 1 and s.plan(0).rate is None
    assert s.plan(200) is None
    assert [(t, st.users) for t, st in s.stages()] == [(0, 2), (30, 5), (60, 8), (90, 10)]


def test_poisson_shape_schedule():
    s = Shape.parse("poisson:rate=1.5,users=20,duration=60")
    assert s.plan(0) == Stage(20, 20, 1.5) and s.plan(59) == Stage(20, 20, 1.5)
    assert s.plan(60) is None
    stepped = Shape.parse("poisson:rate=1,step=0.5,every=20,max=2,duration=100")
    assert [stepped.plan(t).rate for t in (0, 19, 20, 40, 60, 80)] == [1, 1, 1.5, 2, 2, 2]
    assert [st.rate for _, st in stepped.stages()] == [1, 1.5, 2]


@pytest.mark.parametrize(
    "spec",
    [
        "ramp:users=3",
        "constant:users",
        "constant:speed=3",
        "constant:users=x",
        "step:every=0",
        "poisson:rate=0",
        "constant:duration=0",
        "constant:users=-1",
    ],  # fmt: skip
)
def test_bad_shape_specs_are_refused(spec):
    with pytest.raises(ValueError):
        Shape.parse(spec)


def _arrivals(rate_at, users: int, horizon: float, seed: int = 0) -> list[float]:
    """Arrivals of `users` idle users (each sends exactly when its clock says), the rate a
    function of time, looking at it at least every 0.5 s as the locustfile does."""
    arrivals = []
    for u in range(users):
        clock = PoissonClock(random.Random(f"{seed}-{u}"))
        now = 0.0
        while now < horizon:
            delay = clock.wait(now, rate_at(now), users)
            if delay <= 0:
                arrivals.append(now)
                clock.sent()
            else:
                now += min(delay, 0.5)
    return sorted(a for a in arrivals if a < horizon)


def test_poisson_clocks_superpose_to_the_rate():
    """32 users' clocks at rate/32 each: arrivals at `rate` overall with exponential gaps."""
    rate, horizon = 4.0, 2000.0
    arrivals = _arrivals(lambda t: rate, 32, horizon)
    assert len(arrivals) / horizon == pytest.approx(rate, rel=0.05)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
    assert var**0.5 / mean == pytest.approx(1.0, abs=0.08)  # exponential: CV 1


def test_poisson_rate_steps_take_effect_at_once():
    """64 users, 1/s then 6/s after 50 s: each window gets its own rate, although a user's clock
    at 1/64 per second had its next arrival ~64 s away when the rate stepped up."""
    shape = Shape.parse("poisson:rate=1,step=5,every=50,max=6,users=64,duration=100")
    counts = [0, 0, 0, 0]
    for seed in range(10):
        for a in _arrivals(lambda t: shape.plan(t).rate, 64, 100.0, seed):
            counts[int(a // 25)] += 1
    per_s = [c / 10 / 25 for c in counts]
    assert per_s[0] == pytest.approx(1, rel=0.2) and per_s[1] == pytest.approx(1, rel=0.2)
    assert per_s[2] == pytest.approx(6, rel=0.1) and per_s[3] == pytest.approx(6, rel=0.1)


def test_poisson_clock_sends_late_arrivals_at_once():
    clock = PoissonClock(random.Random(0))
    assert clock.wait(0.0, 1.0, 1) > 0
    clock.sent()
    # busy for 100 s: the next arrival is overdue, and stays so when the rate changes
    assert clock.wait(100.0, 1.0, 1) == 0.0 and clock.next_at < 100.0
    assert clock.wait(100.0, 2.0, 1) == 0.0


# ---- the record and the report ------------------------------------------------------------------


def test_record_itl_and_tpot():
    r = RequestRecord(0.0, "t", 1, "chat", 8, "ok", events=[(0.1, 1), (0.2, 1), (0.5, 3), (0.6, 1)])
    assert r.itls() == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1])
    assert r.tpot_s() == pytest.approx((0.6 - 0.1) / 5)
    assert RequestRecord(0.0, "t", 1, "chat", 8, events=[(0.1, 1)]).tpot_s() is None
    back = RequestRecord.from_row(r.row())
    assert back.events == r.events and back.status == "ok" and back.ttft_s is None


def _write_run(tmp_path, rows: list[RequestRecord], meta: dict):
    with open(tmp_path / "requests.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(r.row() for r in rows)
    (tmp_path / "run.json").write_text(json.dumps(meta))


def _synthetic(tmp_path):
    """Tenant a (rank 1): 4 requests 10 s apart, TTFT 100/200/300/400 ms, 5 tokens 50 ms apart.
    Tenant b (rank 2): 2 requests, one ok (TTFT 1 s, 2 tokens 200 ms apart), one 429.
    Tenant c (rank 3): never drawn."""
    t0 = 1_000_000.0
    rows = []
    for i in range(4):
        ttft = 0.1 * (i + 1)
        ev = [(ttft + 0.05 * k, 1) for k in range(5)]
        rows.append(RequestRecord(t0 + 10 * i, "a", 1, "chat", 5, "ok", 7, 5, ttft,
                                  ev[-1][0], 0.0, ev))  # fmt: skip
    rows.append(RequestRecord(t0 + 5, "b", 2, "chat", 2, "ok", 9, 2, 1.0, 1.2, 0.3,
                              [(1.0, 1), (1.2, 1)]))  # fmt: skip
    rows.append(RequestRecord(t0 + 25, "b", 2, "chat", 2, "http_429", e2e_s=0.01))
    meta = {
        "run_id": "x",
        "started_unix": t0,
        "ended_unix": t0 + 40,
        "parameters": {"shape": "constant:users=2,duration=40"},
        "tenants": [
            {"name": "a", "rank": 1, "probability": 0.6},
            {"name": "b", "rank": 2, "probability": 0.3},
            {"name": "c", "rank": 3, "probability": 0.1},
        ],
    }
    _write_run(tmp_path, rows, meta)
    return t0


def test_report_aggregates_per_tenant_and_overall(tmp_path):
    _synthetic(tmp_path)
    records = read_records(tmp_path / "requests.csv")
    meta = json.loads((tmp_path / "run.json").read_text())
    summary = {r["tenant"]: r for r in rep.summarize(records, meta)}
    assert list(summary) == ["a", "b", "c", "overall"]
    a, b, c, overall = summary["a"], summary["b"], summary["c"], summary["overall"]
    assert (a["requests"], a["ok"], a["errors"], a["http_429"]) == (4, 4, 0, 0)
    assert a["ttft_p50_ms"] == pytest.approx(250) and a["ttft_p99_ms"] == pytest.approx(397)
    assert a["itl_p50_ms"] == pytest.approx(50) and a["itl_p99_ms"] == pytest.approx(50)
    assert a["completion_tokens"] == 20 and a["tokens_per_s"] == pytest.approx(0.5)
    assert a["share"] == pytest.approx(4 / 6, abs=1e-4) and a["zipf_p"] == 0.6
    assert (b["requests"], b["ok"], b["http_429"], b["errors"]) == (2, 1, 1, 0)
    assert b["ttft_p50_ms"] == pytest.approx(1000) and b["itl_p50_ms"] == pytest.approx(200)
    assert b["late_over_100ms"] == pytest.approx(0.5)
    assert c["requests"] == 0 and c["ttft_p50_ms"] is None and c["tokens_per_s"] == 0
    assert overall["requests"] == 6 and overall["completion_tokens"] == 22
    assert overall["ttft_p50_ms"] == pytest.approx(300)  # of 100, 200, 300, 400, 1000
    # 16 ITLs of 50 ms and one of 200 ms
    assert overall["itl_p50_ms"] == pytest.approx(50)
    assert overall["itl_p99_ms"] == pytest.approx(50 + 0.84 * 150)


def test_report_timeseries_bins_tokens_by_arrival(tmp_path):
    t0 = _synthetic(tmp_path)
    records = read_records(tmp_path / "requests.csv")
    meta = json.loads((tmp_path / "run.json").read_text())
    ts = rep.timeseries(records, meta, bin_s=10)
    assert sorted({r["t_s"] for r in ts}) == [0, 10, 20, 30]
    row = {(r["t_s"], r["tenant"]): r for r in ts}
    for i in range(4):  # one request of a's per bin, 5 tokens in it
        assert row[i * 10, "a"]["tokens_per_s"] == pytest.approx(0.5)
        assert row[i * 10, "a"]["requests_started"] == 1
        assert row[i * 10, "a"]["ttft_p50_ms"] == pytest.approx(100 * (i + 1))
    assert row[0, "b"]["tokens_per_s"] == pytest.approx(0.2)
    assert row[20, "b"]["requests_started"] == 1 and row[20, "b"]["ttft_p50_ms"] is None
    assert row[0, "overall"]["tokens_per_s"] == pytest.approx(0.7)
    assert row[0, "overall"]["itl_p99_ms"] == pytest.approx(50 + 0.96 * 150)  # 4 x 50, 200
    assert sum(r["tokens_per_s"] * 10 for r in ts if r["tenant"] == "overall") == pytest.approx(22)
    assert t0  # the bins are relative to run.json's start


def test_report_writes_csv_html_and_plots(tmp_path):
    _synthetic(tmp_path)
    out = tmp_path / "out"
    rep.report(tmp_path, out, bin_s=10, dpi=50)
    for name in ("summary.csv", "timeseries.csv", "report.html", *rep.PLOTS):
        assert (out / name).stat().st_size > 0, name
    for png in rep.PLOTS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["tenant"] for r in rows] == ["a", "b", "c", "overall"]
    assert float(rows[0]["ttft_p50_ms"]) == pytest.approx(250)
    html = (out / "report.html").read_text()
    assert all(f'src="{p}"' in html for p in rep.PLOTS) and "<td>overall</td>" in html
