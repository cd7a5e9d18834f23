"""Usage accounting (app/usage.py): engine time shared among the requests inside (fake clock)."""

from __future__ import annotations

import json
import random

import pytest

from app.usage import UsageFile, UsageLedger


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_request_alone_pays_every_second_and_overlapping_ones_share():
    clock = Clock()
    ledger = UsageLedger(clock)
    a = ledger.enter()
    clock.now += 2.0  # a alone: 2 s
    b = ledger.enter()
    clock.now += 3.0  # a and b: 1.5 s each
    assert ledger.leave(a, "acme", 10, 20) == pytest.approx(3.5)
    clock.now += 1.0  # b alone: 1 s
    assert ledger.leave(b, "globex", 5, 7) == pytest.approx(2.5)
    clock.now += 10.0  # idle: nobody pays, not busy
    assert ledger.busy_seconds == pytest.approx(6.0)
    assert ledger.totals["acme"].prompt_tokens == 10 and ledger.totals["acme"].requests == 1
    assert ledger.totals["globex"].completion_tokens == 7


def test_the_charges_add_up_to_the_busy_time_in_any_interleaving():
    rng = random.Random(3)
    clock = Clock()
    ledger = UsageLedger(clock)
    inside: list[tuple[float, str]] = []
    entered = 0
    for _ in range(2000):
        clock.now += rng.expovariate(10.0)
        if inside and (rng.random() < 0.45 or len(inside) > 30):
            mark, tenant = inside.pop(rng.randrange(len(inside)))
            ledger.leave(mark, tenant, rng.randint(1, 50), rng.randint(0, 100))
        else:
            inside.append((ledger.enter(), rng.choice("abcde")))
            entered += 1
    for mark, tenant in inside:
        ledger.leave(mark, tenant, None, None)  # cut off: engine time charged, no tokens
    charged = sum(u.engine_seconds for u in ledger.totals.values())
    assert charged == pytest.approx(ledger.busy_seconds, rel=1e-9)
    assert sum(u.requests for u in ledger.totals.values()) == entered  # each charged once


def test_periods_are_taken_once_and_written_as_json_lines(tmp_path):
    clock = Clock()
    ledger = UsageLedger(clock)
    out = UsageFile(str(tmp_path / "usage"), "replica-1")
    mark = ledger.enter()
    clock.now += 1.0
    ledger.leave(mark, "acme", 3, 4)
    assert out.append(ledger.take_period()) == 1
    assert out.append(ledger.take_period()) == 0  # nothing new: no line
    mark = ledger.enter()
    clock.now += 0.5
    ledger.leave(mark, "globex", 1, 1)
    out.append(ledger.take_period())
    lines = [json.loads(line) for line in out.path.read_text().splitlines()]
    assert [(r["tenant"], r["requests"], r["engine_seconds"]) for r in lines] == [
        ("acme", 1, 1.0),
        ("globex", 1, 0.5),
    ]
    assert lines[0]["period_end"] <= lines[1]["period_start"] and lines[0]["replica"] == "replica-1"
    assert ledger.totals["acme"].requests == 1  # totals are not reset by periods
