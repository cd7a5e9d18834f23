"""QuotaBook and the per-request ceilings, on a fake clock: exact counts and Retry-After bounds."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from app.quotas import (
    Admission,
    QuotaBook,
    TenantLimits,
    check_request_limits,
    default_max_tokens,
)


class Clock:
    """A clock the test moves by hand, so every refill is exact and nothing sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def book(clock: Clock, **limits) -> QuotaBook:
    quotas = QuotaBook(clock)
    quotas.set_limits("acme", TenantLimits(**limits))
    return quotas


def test_limits_are_optional_and_forbid_unknown_fields():
    assert TenantLimits().model_dump() == dict.fromkeys(TenantLimits.model_fields)
    with pytest.raises(ValidationError, match="extra"):
        TenantLimits(request_per_s=1)  # a typo must not silently mean "unlimited"
    with pytest.raises(ValidationError):
        TenantLimits(requests_per_s=0)
    with pytest.raises(ValidationError):
        TenantLimits(max_concurrent=0)


def test_unlimited_tenant_is_always_admitted_and_counted():
    """A tenant nobody configured has no limits, but its usage still shows in metrics."""
    quotas = QuotaBook(Clock())
    tickets = [quotas.admit("anon").ticket for _ in range(100)]
    assert len(set(tickets)) == 100
    assert quotas.usage("anon")["in_flight"] == 100
    for ticket in tickets:
        quotas.finish(ticket, 10)
    usage = quotas.usage("anon")
    assert (usage["in_flight"], usage["refused"], usage["tokens_charged"]) == (0, {}, 1000)


def test_request_rate_bursts_then_refills_with_exact_retry_after():
    clock = Clock()
    quotas = book(clock, requests_per_s=3)
    assert all(quotas.admit("acme").admitted for _ in range(3))  # burst of 3
    refused = quotas.admit("acme")
    assert (refused.admitted, refused.limit) == (False, "requests_per_s")
    assert refused.retry_after_s == pytest.approx(1 / 3)
    assert refused.retry_after_header == 1
    clock.advance(refused.retry_after_s * 0.99)
    assert not quotas.admit("acme").admitted  # the bound is tight: not a moment earlier
    clock.advance(refused.retry_after_s * 0.01)
    assert quotas.admit("acme").admitted


def test_slow_rate_bursts_one_request():
    """Below 1 request/s the burst is still one request, and the wait is a whole period."""
    clock = Clock()
    quotas = book(clock, requests_per_s=0.1)
    assert quotas.admit("acme").admitted
    refused = quotas.admit("acme")
    assert refused.retry_after_s == pytest.approx(10.0)
    assert refused.retry_after_header == 10
    clock.advance(10.0)
    assert quotas.admit("acme").admitted


def test_sustained_rate_is_exact_over_a_long_run():
    """Polling every 10 ms for 60 s admits the burst plus exactly rate * 60 requests."""
    clock = Clock()
    quotas = book(clock, requests_per_s=5)
    admitted = 0
    for _ in range(6000):
        admitted += quotas.admit("acme").admitted
        clock.advance(0.01)
    assert admitted in (5 + 300 - 1, 5 + 300)


def test_concurrency_slot_is_held_until_finish():
    quotas = book(Clock(), max_concurrent=2)
    first, second = quotas.admit("acme"), quotas.admit("acme")
    refused = quotas.admit("acme")
    assert (refused.admitted, refused.limit) == (False, "max_concurrent")
    assert refused.retry_after_header == 1  # a slot may free any moment
    quotas.finish(first.ticket, 5)
    quotas.finish(first.ticket, 5)  # a repeated finish does not free a second slot
    assert quotas.admit("acme").admitted
    assert not quotas.admit("acme").admitted
    assert quotas.usage("acme")["tokens_charged"] == 5
    assert second.admitted


def test_refusal_consumes_nothing():
    """A request refused for concurrency must not spend the tenant's request rate."""
    clock = Clock()
    quotas = book(clock, max_concurrent=1, requests_per_s=2)
    ticket = quotas.admit("acme").ticket
    for _ in range(10):
        assert quotas.admit("acme").limit == "max_concurrent"
    quotas.finish(ticket, 0)
    assert quotas.admit("acme").admitted  # the second burst token is still there


def test_token_budget_goes_into_debt_and_says_when_it_refills():
    """Cost is known only at the end: a big request overdraws, later ones wait for the refill."""
    clock = Clock()
    quotas = book(clock, tokens_per_min=600)  # 10 tokens/s
    ticket = quotas.admit("acme").ticket
    quotas.finish(ticket, 900)  # 300 tokens of debt
    refused = quotas.admit("acme")
    assert (refused.limit, refused.retry_after_s) == ("tokens_per_min", pytest.approx(30.0))
    clock.advance(29.9)
    assert not quotas.admit("acme").admitted
    clock.advance(0.2)
    assert quotas.admit("acme").admitted
    assert quotas.usage("acme")["refused"] == {"tokens_per_min": 2}


def test_token_budget_admits_while_any_is_left():
    clock = Clock()
    quotas = book(clock, tokens_per_min=60)
    quotas.finish(quotas.admit("acme").ticket, 59)
    assert quotas.admit("acme").admitted  # 1 token left
    quotas.set_limits("acme", TenantLimits(tokens_per_min=60))
    assert quotas.usage("acme")["token_budget_left"] == pytest.approx(1.0)


def test_the_refusal_names_the_limit_with_the_longest_wait():
    """All limits must pass together, so the longest wait is the honest lower bound."""
    clock = Clock()
    quotas = book(clock, requests_per_s=1, tokens_per_min=60, max_concurrent=1)
    quotas.finish(quotas.admit("acme").ticket, 120)  # 1 s for a request token, 60 s for tokens
    held = quotas.admit("acme")
    assert (held.limit, held.retry_after_s) == ("tokens_per_min", pytest.approx(60.0))
    clock.advance(60.001)
    assert quotas.admit("acme").admitted


def test_tenants_do_not_share_budgets():
    quotas = QuotaBook(Clock())
    quotas.set_limits("acme", TenantLimits(requests_per_s=1))
    quotas.set_limits("globex", TenantLimits(requests_per_s=1))
    assert quotas.admit("acme").admitted
    assert not quotas.admit("acme").admitted
    assert quotas.admit("globex").admitted


def test_changing_limits_keeps_usage_and_debt():
    clock = Clock()
    quotas = book(clock, tokens_per_min=60, max_concurrent=1)
    ticket = quotas.admit("acme").ticket
    quotas.set_limits("acme", TenantLimits(tokens_per_min=600, max_concurrent=2))
    assert quotas.usage("acme")["in_flight"] == 1  # the running request still counts
    assert quotas.admit("acme").admitted
    quotas.finish(ticket, 120)  # the 60 kept, minus 120: 60 of debt at the new 10 tokens/s
    assert quotas.admit("acme").retry_after_s == pytest.approx(6.0)
    # A tighter limit clips the saved-up budget; a new limit starts full.
    quotas.set_limits("acme", TenantLimits(requests_per_s=2))
    assert quotas.usage("acme")["request_tokens_left"] == 2.0
    assert quotas.usage("acme")["token_budget_left"] is None
    quotas.set_limits("acme", TenantLimits(requests_per_s=1))
    assert quotas.usage("acme")["request_tokens_left"] == 1.0


def test_lowering_concurrency_below_in_flight_refuses_until_drained():
    quotas = book(Clock(), max_concurrent=3)
    tickets = [quotas.admit("acme").ticket for _ in range(3)]
    quotas.set_limits("acme", TenantLimits(max_concurrent=1))
    quotas.finish(tickets[0], 0)
    assert quotas.admit("acme").limit == "max_concurrent"
    quotas.finish(tickets[1], 0)
    quotas.finish(tickets[2], 0)
    assert quotas.admit("acme").admitted


def test_stale_tickets_expire():
    """A replica that died between admit and finish must not hold a slot forever."""
    clock = Clock()
    quotas = book(clock, max_concurrent=1)
    old = quotas.admit("acme").ticket
    clock.advance(600)
    assert quotas.expire_tickets(300) == [old]
    fresh = quotas.admit("acme").ticket
    assert quotas.expire_tickets(300) == []
    quotas.finish(old, 50)  # late finish of an expired ticket: ignored
    assert quotas.usage("acme")["tokens_charged"] == 0
    assert fresh is not None


@pytest.mark.parametrize("wait", [0.0, 1e-6, 0.5, 1.0, 1.01, 59.2])
def test_retry_after_header_rounds_up_to_at_least_one_second(wait):
    header = Admission(False, None, "requests_per_s", wait).retry_after_header
    assert header >= 1 and header >= wait and header == max(1, math.ceil(wait))


def test_request_ceilings_name_the_field():
    limits = TenantLimits(
        max_tokens=256, max_n=2, max_prompt_chars=1000, allowed_models=["support", "base"]
    )
    ok = dict(max_tokens=256, n=2, prompt_chars=1000, model="support")
    assert check_request_limits(limits, **ok) is None
    assert check_request_limits(limits, **ok | {"max_tokens": None, "n": None}) is None
    cases = {
        "max_tokens": {"max_tokens": 257},
        "max_n": {"n": 3},
        "max_prompt_chars": {"prompt_chars": 1001},
        "allowed_models": {"model": "legal"},
    }
    for field, change in cases.items():
        assert f"limit {field}" in check_request_limits(limits, **ok | change)
    huge = dict(max_tokens=10**6, n=100, prompt_chars=10**7, model="anything")
    assert check_request_limits(TenantLimits(), **huge) is None


def test_unset_max_tokens_defaults_to_the_ceiling():
    assert default_max_tokens(TenantLimits(max_tokens=256), None) == 256
    assert default_max_tokens(TenantLimits(max_tokens=256), 10) == 10
    assert default_max_tokens(TenantLimits(), None) is None
