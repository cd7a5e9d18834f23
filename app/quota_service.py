"""The Quotas deployment: one replica holding every tenant's rate state (app/quotas.py), so that
limits hold for the whole fleet whatever the number of ingress replicas.

The ingress calls it only for tenants with a rate limit (requests/s, tokens/min, concurrency):
`admit` before dispatching, `finish` when the response has ended. Limits travel with each
`admit`, so the replica needs no registry of its own and a change made through the admin API
applies from the next request on. If an ingress replica dies between the two calls, its slots
come back after `STALE_TICKET_S`.
"""

from __future__ import annotations

import asyncio

from ray import serve

from app.quotas import Admission, QuotaBook, TenantLimits

STALE_TICKET_S = 3600.0


@serve.deployment(name="Quotas", num_replicas=1, max_ongoing_requests=100_000)
class QuotaService:
    def __init__(self):
        self.book = QuotaBook()
        self._limits: dict[str, TenantLimits] = {}
        self._sweeper = None

    # async: run on the replica's event loop, one at a time (QuotaBook is not thread-safe).
    async def admit(self, tenant: str, limits: TenantLimits) -> Admission:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        if self._limits.get(tenant) != limits:
            self.book.set_limits(tenant, limits)
            self._limits[tenant] = limits
        return self.book.admit(tenant)

    async def finish(self, ticket: int, tokens: int) -> None:
        self.book.finish(ticket, tokens)

    async def usage(self, tenant: str) -> dict:
        return self.book.usage(tenant)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(60)
            self.book.expire_tickets(STALE_TICKET_S)
