"""FairQueue's fairness properties, driven by explicit releases on one event loop (no timing).

A grant is decided synchronously inside `acquire`/`release`; `settle()` only lets the granted
tasks resume and record their tickets, in grant order.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from app.fair_queue import FairQueue, Ticket


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Driver:
    """Submits requests as tasks and records the tickets in the order they were granted."""

    def __init__(self, queue: FairQueue) -> None:
        self.queue = queue
        self.granted: list[Ticket] = []

    def submit(self, tenant: str, cost: float = 100.0, **kw) -> asyncio.Task:
        async def wait() -> Ticket:
            ticket = await self.queue.acquire(tenant, cost=cost, **kw)
            self.granted.append(ticket)
            return ticket

        return asyncio.create_task(wait())

    def tenants(self) -> list[str]:
        return [t.tenant for t in self.granted]

    def running(self) -> list[Ticket]:
        return [t for t in self.granted if t.id in self.queue._live]


def run(scenario):
    return asyncio.run(scenario())


def test_free_seats_admit_at_once_then_requests_wait():
    async def scenario():
        queue = FairQueue(seats=2)
        assert (await queue.acquire("a", cost=1)).seats == 1
        await queue.acquire("a", cost=1)
        drive = Driver(queue)
        drive.submit("a")
        await settle()
        assert drive.granted == [] and queue.snapshot()["a"]["waiting"] == 1

    run(scenario)


def test_flooding_tenant_cannot_starve_a_light_one():
    """The issue's case: 8 seats, one tenant with 40 long requests queued; a light request
    that arrives later gets the next free seat instead of waiting behind all 32 others."""

    async def scenario():
        queue = FairQueue(seats=8)
        drive = Driver(queue)
        for _ in range(40):
            drive.submit("flood", cost=1000)
        await settle()
        assert len(drive.granted) == 8
        drive.submit("light", cost=10)
        await settle()
        queue.release(drive.granted[0], actual_cost=1000)
        await settle()
        assert drive.tenants()[-1] == "light"
        # And again for each later light request: the light tenant never queues behind the flood.
        for round_ in range(5):
            queue.release(drive.granted[-1], actual_cost=10)  # the light request finishes
            await settle()
            drive.submit("light", cost=10)
            await settle()
            queue.release(drive.running()[0], actual_cost=1000)
            await settle()
            assert drive.tenants()[-1] == "light", round_

    run(scenario)


def test_reserve_starts_a_light_request_at_once_while_one_tenant_floods():
    async def scenario():
        queue = FairQueue(seats=8, reserve=2)
        drive = Driver(queue)
        for _ in range(40):
            drive.submit("flood", cost=1000)
        await settle()
        assert len(drive.granted) == 6 and queue.free_seats == 2  # the flood stops at 8 - 2
        drive.submit("light", cost=10)
        drive.submit("other", cost=10)
        await settle()
        assert drive.tenants()[-2:] == ["light", "other"]  # no release needed

    run(scenario)


@pytest.mark.parametrize("max_num_seqs", [1, 16, 32])
def test_a_lone_tenant_gets_max_num_seqs_and_the_reserve_comes_on_top(max_num_seqs):
    """The engine's queue (app/engine.py): one tenant alone runs `max_num_seqs` sequences, as
    plain vLLM with that setting would, and vLLM's batch (`engine_batch`) has room beyond them,
    so another tenant's request still starts at once."""
    from app.config import EngineConfig
    from app.engine import engine_batch, make_fair_queue

    cfg = EngineConfig(max_num_seqs=max_num_seqs)

    async def scenario():
        queue = make_fair_queue(cfg)
        drive = Driver(queue)
        for _ in range(3 * max_num_seqs):
            drive.submit("flood", cost=1000)
        await settle()
        flood_running = len(drive.granted)
        drive.submit("light", cost=10)
        await settle()
        return flood_running, drive.tenants()[-1], queue.seats

    flood_running, last_admitted, seats = run(scenario)
    assert flood_running == max_num_seqs
    assert seats == engine_batch(cfg)
    if max_num_seqs > 1:  # a reserve of 1/8, at least one seat
        assert last_admitted == "light" and seats == max_num_seqs + max(1, max_num_seqs // 8)
    assert engine_batch(cfg.model_copy(update={"fair_sharing": False})) == max_num_seqs


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_seat_is_held_for_each_other_recently_active_tenant():
    """The flood measured on CPU: with a fixed reserve of 2, the third of three light tenants
    waited for a flooder's release whenever the other two held the reserved seats. With the
    window, the flooder leaves one seat per other active tenant, so each light request starts
    at once, even when all three light tenants are in flight together."""

    async def scenario():
        clock = FakeClock()
        queue = FairQueue(seats=16, reserve=2, recent_window_s=10.0, clock=clock)
        drive = Driver(queue)
        lights = ["globex", "initech", "umbrella"]
        for name in lights:  # each light tenant came and went a moment ago
            queue.release(await queue.acquire(name, cost=10), actual_cost=10)
        clock.now += 3.0
        for _ in range(40):
            drive.submit("acme", cost=1000)
        await settle()
        assert len(drive.granted) == 13 and queue.free_seats == 3  # 16 - one per light tenant
        for name in lights:  # all three at once: no release needed
            drive.submit(name, cost=10)
        await settle()
        assert drive.tenants()[-3:] == lights and queue.free_seats == 0
        # Light tenants gone quiet past the window: the flooder gets their seats back as seats
        # free, all but the fixed reserve.
        for ticket in drive.granted[-3:]:
            queue.release(ticket, actual_cost=10)
        clock.now += 10.5
        queue.release(drive.granted[0], actual_cost=1000)
        await settle()
        assert drive.tenants()[-5:] == lights + ["acme"] * 2
        assert queue.snapshot()["acme"]["running"] == 14 and queue.free_seats == 2

    run(scenario)


def test_held_back_seats_are_bounded_and_never_starve_a_wide_request():
    async def scenario():
        clock = FakeClock()
        queue = FairQueue(seats=8, reserve=1, recent_window_s=10.0, clock=clock)
        assert [queue.held_back(n) for n in (0, 1, 3, 20)] == [1, 1, 3, 4]  # at most half
        two_each = FairQueue(seats=16, reserve=2, recent_window_s=10.0, seats_per_active=2)
        assert [two_each.held_back(n) for n in (0, 1, 3, 5)] == [2, 2, 6, 8]
        drive = Driver(queue)
        for i in range(10):  # ten tenants each holding a seat ... then most leave
            drive.submit(f"t{i}", cost=1)
        await settle()
        while running := drive.running():
            for ticket in running:
                queue.release(ticket, actual_cost=1)
            await settle()
        assert len(drive.granted) == 10
        wide = await queue.acquire("wide", cost=1, seats=7)  # holds nothing: may start 7
        assert wide.seats == 7
        drive.submit("wide", cost=1)  # but not an eighth seat while the others are recent
        await settle()
        assert queue.free_seats == 1 and drive.tenants().count("wide") == 0

    run(scenario)


def test_a_tenant_at_its_cap_does_not_hold_the_line():
    """The reserve cap passes over the capped tenant; it waits for its own release only."""

    async def scenario():
        queue = FairQueue(seats=4, reserve=1)
        drive = Driver(queue)
        for _ in range(5):
            drive.submit("flood", cost=1)  # lowest counter, yet capped at 3 seats
        drive.submit("light", cost=1000)
        await settle()
        assert sorted(drive.tenants()) == ["flood"] * 3 + ["light"]
        wide = await FairQueue(seats=4, reserve=1).acquire("wide", cost=1, seats=10)
        assert wide.seats == 3  # n > 1 is capped at what one tenant may hold

    run(scenario)


@pytest.mark.parametrize("reserve", [0, 2])
def test_backlogged_tenants_get_token_shares_of_their_weights(reserve):
    """Three tenants, weights 1:2:3, very different request sizes, real costs below the
    reservation: served tokens converge to the weights (within 10 %), request counts do not."""
    weights = {"a": 1.0, "b": 2.0, "c": 3.0}
    sizes = {"a": 400.0, "b": 50.0, "c": 150.0}

    async def scenario():
        rng = random.Random(7)
        queue = FairQueue(seats=8, reserve=reserve)
        drive = Driver(queue)
        for tenant in weights:
            for _ in range(6):
                drive.submit(tenant, cost=sizes[tenant], weight=weights[tenant])
        await settle()
        served = dict.fromkeys(weights, 0.0)
        requests = dict.fromkeys(weights, 0)
        for step in range(4000):
            ticket = rng.choice(drive.running())
            actual = ticket.cost * rng.uniform(0.3, 1.0)
            queue.release(ticket, actual_cost=actual)
            if step >= 400:  # after warm-up
                served[ticket.tenant] += actual
                requests[ticket.tenant] += 1
            # keep every tenant backlogged
            drive.submit(ticket.tenant, cost=sizes[ticket.tenant], weight=weights[ticket.tenant])
            await settle()
        total = sum(served.values())
        for tenant, weight in weights.items():
            share, target = served[tenant] / total, weight / sum(weights.values())
            assert abs(share / target - 1) <= 0.10, (tenant, share, target)
        assert requests["b"] > 2 * requests["a"]  # fair in tokens, not in requests

    run(scenario)


def test_priority_class_goes_first_whatever_the_counters():
    async def scenario():
        queue = FairQueue(seats=1)
        drive = Driver(queue)
        first = await queue.acquire("interactive", cost=10_000)  # a high counter
        drive.submit("batch", cost=1, priority=1)
        drive.submit("interactive", cost=1, priority=1)
        drive.submit("interactive", cost=1, priority=0)
        await settle()
        queue.release(first)
        await settle()
        assert [(t.tenant, t.cost) for t in drive.granted] == [("interactive", 1)]
        assert drive.granted[0].id == max(t.id for t in drive.granted)  # overtook its own batch
        queue.release(drive.granted[0])
        await settle()
        assert drive.tenants()[-1] == "batch"  # within the class, the lower counter

    run(scenario)


def test_an_idle_tenant_is_lifted_and_cannot_bank_its_idle_time():
    """`b` was idle while `a` was served 50 requests; when `b` comes back it goes first at
    the next seat but then alternates with `a` instead of taking 50 in a row."""

    async def scenario():
        queue = FairQueue(seats=1)
        drive = Driver(queue)
        for _ in range(60):
            drive.submit("a", cost=100)
        await settle()
        for _ in range(50):
            queue.release(drive.granted[-1])
            await settle()
        counter_a = queue.snapshot()["a"]["counter"]
        for _ in range(20):
            drive.submit("b", cost=100)
        await settle()
        assert queue.snapshot()["b"]["counter"] == counter_a
        for _ in range(10):
            queue.release(drive.granted[-1])
            await settle()
        assert drive.tenants()[-10:] == ["b", "a"] * 5

    run(scenario)


def test_after_everyone_went_idle_a_newcomer_starts_from_the_last_counter():
    async def scenario():
        queue = FairQueue(seats=1)
        heavy = await queue.acquire("heavy", cost=5000)
        queue.release(heavy)  # everyone idle now; the floor is heavy's counter
        fresh = await queue.acquire("fresh", cost=1)
        assert queue.snapshot()["fresh"]["counter"] == 5000 + 1
        queue.release(fresh)

    run(scenario)


def test_a_cancelled_waiter_leaves_cleanly():
    async def scenario():
        queue = FairQueue(seats=1)
        drive = Driver(queue)
        held = await queue.acquire("a", cost=1)
        waiting = drive.submit("b")
        await settle()
        waiting.cancel()
        await settle()
        assert waiting.cancelled()
        assert queue.snapshot()["b"] == {"running": 0, "waiting": 0, "counter": 1.0}
        queue.release(held)
        await settle()
        assert drive.granted == [] and queue.free_seats == 1

    run(scenario)


def test_cancelling_the_request_that_holds_the_line_lets_the_next_one_in():
    async def scenario():
        queue = FairQueue(seats=4)
        drive = Driver(queue)
        held = await queue.acquire("x", cost=1, seats=2)
        wide = drive.submit("a", seats=4, cost=1)  # lowest counter: its turn, but 2 seats free
        drive.submit("b", cost=500)
        await settle()
        assert drive.granted == []  # strict order: the narrow request does not overtake
        wide.cancel()
        await settle()
        assert drive.tenants() == ["b"]
        queue.release(held)

    run(scenario)


def test_cancelled_in_the_same_turn_as_its_grant_gives_the_seat_back_uncharged():
    async def scenario():
        queue = FairQueue(seats=1)
        drive = Driver(queue)
        held = await queue.acquire("a", cost=1)
        late = drive.submit("b", cost=300)
        other = drive.submit("c", cost=1)
        await settle()
        queue.release(held)  # grants b's seat, b's task has not run yet
        late.cancel()
        await settle()
        assert late.cancelled()
        assert queue.snapshot()["b"]["running"] == 0
        assert queue.snapshot()["b"]["counter"] == pytest.approx(1.0)  # lifted, not charged
        assert drive.tenants() == ["c"]  # the seat went on to the next waiter
        assert other.done()

    run(scenario)


def test_n_requests_take_n_seats_capped_at_the_replica():
    async def scenario():
        queue = FairQueue(seats=4)
        drive = Driver(queue)
        three = await queue.acquire("a", cost=1, seats=3)
        assert three.seats == 3 and queue.free_seats == 1
        drive.submit("a", cost=1, seats=2)
        drive.submit("a", cost=1, seats=1)  # FIFO within a tenant: waits behind the wide one
        await settle()
        assert drive.granted == []
        queue.release(three)
        await settle()
        assert [t.seats for t in drive.granted] == [2, 1]
        for ticket in drive.granted:
            queue.release(ticket)
        huge = await queue.acquire("a", cost=1, seats=1000)
        assert huge.seats == 4 and queue.free_seats == 0

    run(scenario)


def test_release_corrects_the_counter_to_the_real_cost_once():
    async def scenario():
        queue = FairQueue(seats=2)
        other = await queue.acquire("b", cost=1)  # stays running throughout
        ticket = await queue.acquire("a", cost=1000, weight=2.0)
        assert queue.snapshot()["a"]["counter"] == 1 + 500  # lifted to b's, plus cost / weight
        queue.release(ticket, actual_cost=200)
        assert queue.snapshot()["a"]["counter"] == 1 + 100
        queue.release(ticket, actual_cost=0)  # a repeated release changes nothing
        assert queue.snapshot()["a"]["counter"] == 1 + 100 and queue.free_seats == 1
        kept = await queue.acquire("a", cost=50)
        queue.release(kept)  # real cost unknown: the reservation stands
        assert queue.snapshot()["a"]["counter"] == 1 + 150
        queue.release(other)

    run(scenario)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        FairQueue(seats=4, reserve=4)
    with pytest.raises(ValueError):
        FairQueue(seats=0)
    with pytest.raises(ValueError):
        FairQueue(seats=4, recent_window_s=-1)

    async def scenario():
        with pytest.raises(ValueError):
            await FairQueue(seats=1).acquire("a", cost=1, weight=0)

    run(scenario)


def test_the_engines_cost_estimate_is_never_negative_for_a_bad_budget():
    """A bad max_tokens is vLLM's to refuse (a 400); the estimate made before must not make the
    fair queue raise first (that answered 503 for `max_tokens: -5` with a short prompt)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from app.engine import reserved_tokens

    def request(**kw):
        return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Hi"}], **kw)

    assert reserved_tokens(request(max_tokens=-5)) >= 0
    assert reserved_tokens(request(max_tokens=100, n=2)) == pytest.approx(0.5 + 200)
