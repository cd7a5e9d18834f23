"""Fair sharing of one engine replica's sequence slots among tenants: a virtual token counter.

vLLM serves its queue first come, first served, so one tenant with many long requests (or n > 1)
makes everyone else wait behind it. `FairQueue` sits in front of a replica and hands out its
`seats` (vLLM's max_num_seqs) with S-LoRA's virtual token counter (Sheng et al., 2024, "Fairness
in Serving Large Language Models"):

- Each tenant has a counter of the tokens it was served, divided by its weight. A free seat goes
  to the waiting tenant with the lowest counter, so backlogged tenants are served tokens in
  proportion to their weights. Cost is charged when a request is admitted (its reservation:
  prompt estimate + max_tokens * n) and corrected when it ends, once the real count is known.
- A tenant that becomes backlogged after being idle is lifted to the lowest counter of the
  tenants waiting or running (or, when nobody is, to that of the last one to leave): idle time
  is not saved up to flood later, yet its next request goes first at the next free seat.
- Priority classes come first: every waiting request of a lower `priority` value (0 interactive,
  1 batch) goes before any of a higher one. Within a tenant and class: first in, first out.
- Seats are held back from any single tenant so that another tenant's request starts at once
  even while one floods: at least `reserve`, and, with `recent_window_s`, `seats_per_active`
  for each other tenant active in that window (waiting, running, or seen within it), up to half
  the seats. A fixed reserve of 2 left the third of three light tenants waiting for a flooder's
  release (seconds) whenever all three had a request in flight; a seat per active tenant still
  left one waiting whenever a light tenant had two requests in flight at once.
  The price: seats left idle while only one tenant has work, for at most the window after the
  others went quiet. A tenant holding no seat may always start one request, so the cap never
  starves a wide (n > 1) request. reserve 0 and no window = purely work-conserving.
- The order is strict: when the next request needs more seats than are free (n > 1), later ones
  wait too, so a wide request is never starved by a stream of narrow ones. A tenant at its
  reserve cap is skipped instead, since its own release is what it waits for.

Everything is decided synchronously in `acquire`, `release` and on cancellation, on one event
loop; tests drive it with explicit releases and no sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Ticket:
    """Seats held by one admitted request; give it back with `FairQueue.release`."""

    id: int
    tenant: str
    seats: int
    cost: float
    weight: float
    admitted_at: float


@dataclass(eq=False)
class _Waiter:
    seq: int
    tenant: str
    priority: int
    seats: int
    cost: float
    weight: float
    future: asyncio.Future = field(repr=False)
    queued: bool = True


@dataclass
class _Tenant:
    counter: float = 0.0
    running: int = 0  # seats held
    waiting: int = 0  # requests queued, all priorities
    last_grant: int = 0  # when it was last admitted, in grants
    last_seen: float = float("-inf")  # clock time of its last arrival or release


class FairQueue:
    """Admission to one replica's `seats` by virtual token counter (see the module docstring)."""

    def __init__(
        self,
        seats: int,
        reserve: int = 0,
        recent_window_s: float = 0.0,
        seats_per_active: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ):
        if seats < 1 or not 0 <= reserve < seats or recent_window_s < 0 or seats_per_active < 0:
            raise ValueError(
                "need seats >= 1, 0 <= reserve < seats, recent_window_s >= 0, "
                f"seats_per_active >= 0; got {seats}, {reserve}, {recent_window_s}, "
                f"{seats_per_active}"
            )
        self.seats = seats
        self.reserve = reserve
        self.recent_window_s = recent_window_s
        self.seats_per_active = seats_per_active
        self._clock = clock
        self._free = seats
        self._tenants: dict[str, _Tenant] = {}
        self._queues: dict[tuple[int, str], deque[_Waiter]] = {}  # (priority, tenant) -> FIFO
        self._live: dict[int, Ticket] = {}
        self._ids = itertools.count(1)
        self._grants = itertools.count(1)
        self._floor = 0.0  # counter of the last tenant to go idle, when all are idle

    @property
    def free_seats(self) -> int:
        return self._free

    @property
    def waiting_requests(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    @property
    def tenant_cap(self) -> int:
        """The most seats one tenant may hold whoever else is active (one request of a tenant
        holding none may always start, up to this many seats)."""
        return self.seats - self.reserve

    def held_back(self, other_active_tenants: int) -> int:
        """Seats kept from one tenant while `other_active_tenants` others are active."""
        if not self.recent_window_s:
            return self.reserve
        wanted = other_active_tenants * self.seats_per_active
        return max(self.reserve, min(wanted, self.seats // 2))

    async def acquire(
        self, tenant: str, *, weight: float = 1.0, priority: int = 0, seats: int = 1, cost: float
    ) -> Ticket:
        """Wait for seats (n for n > 1, at most `tenant_cap`); cancelling the wait is safe."""
        if weight <= 0 or cost < 0 or seats < 1:
            raise ValueError(
                f"need weight > 0, cost >= 0, seats >= 1; got {weight}, {cost}, {seats}"
            )
        state = self._tenants.setdefault(tenant, _Tenant())
        state.last_seen = self._clock()
        if state.waiting == 0 and state.running == 0:
            state.counter = max(state.counter, self._lift_to(tenant))
        waiter = _Waiter(
            next(self._ids), tenant, priority, min(seats, self.tenant_cap), cost, weight,
            asyncio.get_running_loop().create_future(),
        )  # fmt: skip
        self._queues.setdefault((priority, tenant), deque()).append(waiter)
        state.waiting += 1
        self._dispatch()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                # Admitted in the same loop turn as the cancel: give the seats back, uncharged.
                self.release(waiter.future.result(), actual_cost=0.0)
            else:
                self._remove(waiter)
            raise

    def release(self, ticket: Ticket, actual_cost: float | None = None) -> None:
        """Free the ticket's seats and correct its tenant's counter to the real cost, if known.
        A ticket already released is ignored."""
        if self._live.pop(ticket.id, None) is None:
            return
        state = self._tenants[ticket.tenant]
        if actual_cost is not None:
            state.counter += (actual_cost - ticket.cost) / ticket.weight
        state.running -= ticket.seats
        state.last_seen = self._clock()
        self._free += ticket.seats
        self._note_idle(ticket.tenant)
        self._dispatch()

    def snapshot(self) -> dict[str, dict]:
        """Per tenant: seats running, requests waiting, virtual counter."""
        return {
            name: {"running": t.running, "waiting": t.waiting, "counter": t.counter}
            for name, t in self._tenants.items()
        }

    def _lift_to(self, tenant: str) -> float:
        """The lowest counter among the other tenants waiting or running, else the floor."""
        active = [
            t.counter
            for name, t in self._tenants.items()
            if name != tenant and (t.waiting or t.running)
        ]
        return min(active) if active else self._floor

    def _note_idle(self, tenant: str) -> None:
        state = self._tenants[tenant]
        if state.waiting == 0 and state.running == 0:
            if not any(t.waiting or t.running for t in self._tenants.values()):
                self._floor = state.counter

    def _remove(self, waiter: _Waiter) -> None:
        if not waiter.queued:  # `_dispatch` already dropped it
            return
        self._unqueue(waiter)
        self._note_idle(waiter.tenant)
        self._dispatch()  # the removed waiter may have been the one holding the line

    def _unqueue(self, waiter: _Waiter) -> None:
        key = (waiter.priority, waiter.tenant)
        queue = self._queues[key]
        queue.remove(waiter)
        if not queue:
            del self._queues[key]
        waiter.queued = False
        self._tenants[waiter.tenant].waiting -= 1

    def _active_tenants(self) -> int:
        """Tenants waiting, running, or seen within the recent window."""
        if not self.recent_window_s:
            return 0
        since = self._clock() - self.recent_window_s
        return sum(
            1 for t in self._tenants.values() if t.waiting or t.running or t.last_seen >= since
        )

    def _next(self) -> _Waiter | None:
        """The waiter whose turn it is: lowest priority value, then lowest counter; on equal
        counters (a newcomer lifted to a flooder's) the tenant holding fewer seats, then the one
        admitted longest ago, so the newcomer goes first; then arrival. Tenants at their cap are
        passed over."""
        # Every tenant with a waiter is active itself: the others are one fewer.
        cap = self.seats - self.held_back(self._active_tenants() - 1)
        best, best_key = None, None
        for (priority, tenant), queue in self._queues.items():
            head, state = queue[0], self._tenants[tenant]
            if state.running and state.running + head.seats > cap:
                continue
            key = (priority, state.counter, state.running, state.last_grant, head.seq)
            if best_key is None or key < best_key:
                best, best_key = head, key
        return best

    def _dispatch(self) -> None:
        while (waiter := self._next()) is not None:
            if waiter.future.cancelled():  # cancelled, its task not yet resumed to leave
                self._unqueue(waiter)
                self._note_idle(waiter.tenant)
                continue
            if waiter.seats > self._free:
                return  # strict order: nobody overtakes the request whose turn it is
            self._unqueue(waiter)
            state = self._tenants[waiter.tenant]
            state.running += waiter.seats
            state.counter += waiter.cost / waiter.weight
            state.last_grant = next(self._grants)
            self._free -= waiter.seats
            ticket = Ticket(
                waiter.seq, waiter.tenant, waiter.seats, waiter.cost, waiter.weight, self._clock()
            )
            self._live[ticket.id] = ticket
            waiter.future.set_result(ticket)
