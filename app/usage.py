"""Usage accounting per tenant on one engine replica: tokens in and out, and engine time.

Engine time is the replica's busy time shared among the requests it serves: while `k` requests
are inside vLLM (admitted by the fair queue, not yet finished), each is charged 1/k of every
second, so a request alone in the batch pays the whole step and one among 16 pays a sixteenth.
The shares add up to the replica's busy time exactly (`UsageLedger.busy_seconds`): nothing is
counted twice and no busy second goes uncharged. Tokens are vLLM's own final counts of each
request, so they add up to vLLM's prompt/generation token counters (requests cut off before
vLLM reports a final count are charged the engine time they used and no tokens).

The ledger keeps running totals (exported as metrics by the engine replica) and the usage of the
current period, which `UsageFile` appends as JSON lines, one per tenant active in the period,
for billing to read:

    {"period_start": "...Z", "period_end": "...Z", "replica": "...", "tenant": "acme",
     "requests": 12, "prompt_tokens": 310, "completion_tokens": 768, "engine_seconds": 4.21}
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class UsageConfig(BaseModel):
    """Where each engine replica appends its usage lines (`usage-<replica>.jsonl`), and how
    often. No `dir`: metrics only."""

    model_config = ConfigDict(extra="forbid")
    dir: str | None = None
    period_s: float = Field(default=60.0, gt=0)


@dataclass
class TenantUsage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0

    def add(self, prompt_tokens: int, completion_tokens: int, engine_seconds: float) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.engine_seconds += engine_seconds


class UsageLedger:
    """Processor-sharing clock over the requests in the engine, and per-tenant usage."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._last = clock()
        self._share = 0.0  # engine seconds charged so far to a request present all along
        self._inside = 0
        self.busy_seconds = 0.0
        self.totals: dict[str, TenantUsage] = {}
        self.period: dict[str, TenantUsage] = {}

    def _advance(self) -> None:
        now = self._clock()
        if self._inside:
            self._share += (now - self._last) / self._inside
            self.busy_seconds += now - self._last
        self._last = now

    def enter(self) -> float:
        """A request goes into the engine; keep the mark to pass to `leave`."""
        self._advance()
        self._inside += 1
        return self._share

    def leave(
        self, mark: float, tenant: str, prompt_tokens: int | None, completion_tokens: int | None
    ) -> float:
        """The request is done; charge its tenant. Returns the engine seconds charged."""
        self._advance()
        self._inside -= 1
        engine_seconds = self._share - mark
        for book in (self.totals, self.period):
            book.setdefault(tenant, TenantUsage()).add(
                prompt_tokens or 0, completion_tokens or 0, engine_seconds
            )
        return engine_seconds

    def take_period(self) -> dict[str, TenantUsage]:
        """The usage since the last call (requests finished in it), and start a new period."""
        period, self.period = self.period, {}
        return period


class UsageFile:
    """Appends one replica's periods to `<dir>/usage-<replica>.jsonl` (created on first write)."""

    def __init__(self, directory: str, replica_id: str):
        self.path = Path(directory) / f"usage-{replica_id}.jsonl"
        self.replica_id = replica_id
        self._period_start = _utc_now()

    def append(self, period: dict[str, TenantUsage]) -> int:
        """Write the period's lines; returns how many (none when nobody was served)."""
        start, end = self._period_start, _utc_now()
        self._period_start = end
        if not period:
            return 0
        lines = [
            json.dumps(
                {
                    "period_start": start,
                    "period_end": end,
                    "replica": self.replica_id,
                    "tenant": tenant,
                    **asdict(usage),
                }
            )
            for tenant, usage in sorted(period.items())
        ]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:  # one write of whole lines: readers never see half a line
            f.write("".join(line + "\n" for line in lines))
        return len(lines)


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
