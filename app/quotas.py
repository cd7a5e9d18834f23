"""Per-tenant limits, and the book that enforces them across every ingress replica.

One `QuotaBook` lives in one Ray actor shared by all ingress replicas, so its counts are exact:
a tenant allowed 2 requests/s gets 2 requests/s from the whole fleet, not 2 per replica. Its
methods are synchronous and never await, so the actor runs them one at a time.

Rates are token buckets refilled continuously from an injectable clock (tests drive a fake one):
- `requests_per_s`: a bucket of max(1, rate) requests; each admitted request takes one.
- `tokens_per_min`: a bucket of one minute's tokens. A request is admitted while any budget is
  left (> 0); its real cost (prompt + completion) is only known when it ends, so `finish` charges
  it then and the budget may go negative: the tenant then waits until it refills.
- `max_concurrent`: requests between `admit` and `finish`.

A refusal names the limit and carries a lower bound on the time until that limit could admit:
the time a bucket needs to refill, or 0 for concurrency (a slot may free at any moment). The
header value is rounded up to at least 1 s (`Admission.retry_after_header`).
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

# Float slack so a bucket refilled to exactly one request (1/3 s at 3 req/s) counts as full.
_EPS = 1e-9


class TenantLimits(BaseModel):
    """A tenant's limits; None means unlimited. Changeable at run time (`QuotaBook.set_limits`)."""

    model_config = ConfigDict(extra="forbid")

    requests_per_s: float | None = Field(default=None, gt=0, description="burst max(1, rate)")
    tokens_per_min: int | None = Field(default=None, ge=1, description="prompt + completion")
    max_concurrent: int | None = Field(default=None, ge=1, description="requests in flight")
    max_tokens: int | None = Field(default=None, ge=1, description="per-request max_tokens cap")
    max_n: int | None = Field(default=None, ge=1)
    max_prompt_chars: int | None = Field(default=None, ge=1, description="characters, untokenized")
    allowed_models: list[str] | None = Field(
        default=None, description="tenant-local model names it may use; None: all it can see"
    )


@dataclass(frozen=True)
class Admission:
    """The answer to `QuotaBook.admit`. `limit` names the refusing `TenantLimits` field."""

    admitted: bool
    ticket: int | None = None
    limit: str | None = None
    retry_after_s: float = 0.0

    @property
    def retry_after_header(self) -> int:
        """Whole seconds for a Retry-After header: rounded up, at least 1."""
        return max(1, math.ceil(self.retry_after_s))


def check_request_limits(
    limits: TenantLimits, *, max_tokens: int | None, n: int | None, prompt_chars: int, model: str
) -> str | None:
    """The first per-request ceiling this request breaks, as a message naming the limit, or None.

    `max_tokens` is the request's max_tokens or max_completion_tokens; None (unset) passes, and
    the caller should then send `default_max_tokens` so vLLM does not fill the whole context.
    """
    if limits.allowed_models is not None and model not in limits.allowed_models:
        return f"This tenant may not use the model `{model[:128]}` (limit allowed_models)."
    if limits.max_tokens is not None and max_tokens is not None and max_tokens > limits.max_tokens:
        return f"max_tokens must be at most {limits.max_tokens} for this tenant (limit max_tokens)."
    if limits.max_n is not None and (n or 1) > limits.max_n:
        return f"n must be at most {limits.max_n} for this tenant (limit max_n)."
    if limits.max_prompt_chars is not None and prompt_chars > limits.max_prompt_chars:
        return (
            f"The prompt must be at most {limits.max_prompt_chars} characters for this tenant "
            "(limit max_prompt_chars)."
        )
    return None


def default_max_tokens(limits: TenantLimits, requested: int | None) -> int | None:
    """The max_tokens to send: the request's own, else the tenant's ceiling (None: vLLM's)."""
    return requested if requested is not None else limits.max_tokens


@dataclass
class _Bucket:
    """A continuously refilled token bucket; `level` may go negative (debt)."""

    rate: float  # units per second
    capacity: float
    level: float
    at: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + max(0.0, now - self.at) * self.rate)
        self.at = max(self.at, now)

    def wait_until(self, target: float) -> float:
        """Seconds until the level reaches `target` (0 if it has)."""
        return max(0.0, (target - self.level) / self.rate)


@dataclass
class _Tenant:
    limits: TenantLimits
    requests: _Bucket | None = None
    tokens: _Bucket | None = None
    in_flight: int = 0
    admitted: int = 0
    tokens_charged: int = 0
    refused: Counter[str] = field(default_factory=Counter)


def _rebucket(old: _Bucket | None, rate: float | None, capacity: float, now: float):
    """The bucket for a new limit: a new limit starts full; a changed one keeps its level
    (debt included), refilled at the old rate up to now and clipped to the new capacity."""
    if rate is None:
        return None
    if old is None:
        return _Bucket(rate, capacity, capacity, now)
    old.refill(now)
    return _Bucket(rate, capacity, min(old.level, capacity), now)


class QuotaBook:
    """Exact per-tenant rate, token and concurrency limits (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}
        self._tickets: dict[int, tuple[str, float]] = {}  # ticket -> (tenant, admitted at)
        # Random start: a ticket from before a restart of the book's actor, finished after it,
        # must not free a request admitted since (ids are otherwise sequential).
        self._ids = itertools.count(secrets.randbits(62))

    def set_limits(self, tenant: str, limits: TenantLimits) -> None:
        """Set or change a tenant's limits; in-flight requests, bucket levels and debt stay."""
        now = self._clock()
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant(limits)
        rps, tpm = limits.requests_per_s, limits.tokens_per_min
        state.requests = _rebucket(state.requests, rps, max(1.0, rps or 0.0), now)
        state.tokens = _rebucket(state.tokens, tpm and tpm / 60.0, float(tpm or 0), now)
        state.limits = limits

    def _state(self, tenant: str) -> _Tenant:
        """A tenant never configured is unlimited, but its usage is still counted."""
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant(TenantLimits())
        return state

    def admit(self, tenant: str) -> Admission:
        """Admit a request if every limit allows it, taking a concurrency slot and a request
        token; otherwise take nothing and name the limit that holds it back longest."""
        now = self._clock()
        state = self._state(tenant)
        waits: list[tuple[float, str]] = []  # (seconds until it could admit, limit)
        cap = state.limits.max_concurrent
        if cap is not None and state.in_flight >= cap:
            waits.append((0.0, "max_concurrent"))
        if state.requests is not None:
            state.requests.refill(now)
            if state.requests.level < 1.0 - _EPS:
                waits.append((state.requests.wait_until(1.0), "requests_per_s"))
        if state.tokens is not None:
            state.tokens.refill(now)
            if state.tokens.level <= 0:
                waits.append((state.tokens.wait_until(0.0), "tokens_per_min"))
        if waits:
            # Every limit must pass at once, so the longest wait is still a lower bound.
            wait, limit = max(waits, key=lambda w: w[0])
            state.refused[limit] += 1
            return Admission(False, None, limit, wait)
        if state.requests is not None:
            state.requests.level -= 1.0
        state.in_flight += 1
        state.admitted += 1
        ticket = next(self._ids)
        self._tickets[ticket] = (tenant, now)
        return Admission(True, ticket)

    def finish(self, ticket: int, tokens: int) -> None:
        """End an admitted request: free its slot and charge its prompt + completion tokens.
        An unknown or already finished ticket is ignored, so a retried call cannot double-free."""
        entry = self._tickets.pop(ticket, None)
        if entry is None:
            return
        state = self._tenants[entry[0]]
        state.in_flight -= 1
        tokens = max(0, int(tokens))
        state.tokens_charged += tokens
        if state.tokens is not None:
            state.tokens.refill(self._clock())
            state.tokens.level -= tokens

    def expire_tickets(self, max_age_s: float) -> list[int]:
        """Free the slots of tickets admitted more than `max_age_s` ago, charging nothing: the
        safety net for an ingress replica that died between admit and finish."""
        cutoff = self._clock() - max_age_s
        stale = [t for t, (_, at) in self._tickets.items() if at < cutoff]
        for ticket in stale:
            self.finish(ticket, 0)
        return stale

    def usage(self, tenant: str) -> dict:
        """Current counts and bucket levels (refilled to now) of a tenant, for metrics."""
        state = self._state(tenant)
        now = self._clock()
        for bucket in (state.requests, state.tokens):
            if bucket is not None:
                bucket.refill(now)
        return {
            "in_flight": state.in_flight,
            "admitted": state.admitted,
            "refused": dict(state.refused),
            "tokens_charged": state.tokens_charged,
            "request_tokens_left": None if state.requests is None else state.requests.level,
            "token_budget_left": None if state.tokens is None else state.tokens.level,
        }
