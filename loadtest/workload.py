"""The load test's workload, without Locust or a server: Zipf tenant popularity, length
distributions, rate shapes and the per-request record the locustfile writes and the report reads.

Everything here is deterministic given a `random.Random`, so tests/unit/test_loadtest.py checks it
without a server.
"""

from __future__ import annotations

import bisect
import csv
import math
import random
from dataclasses import dataclass, field
from itertools import accumulate

# ---- tenants ------------------------------------------------------------------------------------


def zipf_weights(n: int, s: float) -> list[float]:
    """P(rank i) for i = 1..n, proportional to 1 / i**s (s = 0: uniform)."""
    if n < 1:
        raise ValueError("need at least one tenant")
    if s < 0:
        raise ValueError("the Zipf exponent must be >= 0")
    raw = [1.0 / (i**s) for i in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


class ZipfSampler:
    """Draws a rank 0..n-1 (0 the most popular) with Zipf probabilities."""

    def __init__(self, n: int, s: float, rng: random.Random):
        self.weights = zipf_weights(n, s)
        self._cum = list(accumulate(self.weights))
        self._cum[-1] = 1.0
        self.rng = rng

    def __call__(self) -> int:
        return bisect.bisect_right(self._cum, self.rng.random())


def tenant_names(run_id: str, n: int) -> list[str]:
    """Tenant names of a run, by rank: `lt-<run id>-t01` is the most popular."""
    width = max(2, len(str(n)))
    return [f"lt-{run_id}-t{i:0{width}d}" for i in range(1, n + 1)]


# ---- lengths -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthDist:
    """A token count distribution, from a spec string:

    fixed:N | uniform:LO:HI | lognormal:MEDIAN:SIGMA[:MAX] | exponential:MEAN[:MAX]

    Draws are integers >= 1 (and <= MAX where given)."""

    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        kind, _, rest = spec.strip().partition(":")
        try:
            params = tuple(float(p) for p in rest.split(":")) if rest else ()
        except ValueError:
            raise ValueError(f"length distribution {spec!r}: parameters must be numbers") from None
        arity = {"fixed": (1,), "uniform": (2,), "lognormal": (2, 3), "exponential": (1, 2)}
        if kind not in arity:
            raise ValueError(f"length distribution {spec!r}: kind must be one of {list(arity)}")
        if len(params) not in arity[kind]:
            raise ValueError(f"length distribution {spec!r}: {kind} takes {arity[kind]} numbers")
        if any(p <= 0 for p in params) or (kind == "uniform" and params[0] > params[1]):
            raise ValueError(f"length distribution {spec!r}: parameters must be > 0 (LO <= HI)")
        return cls(kind, params)

    def sample(self, rng: random.Random) -> int:
        p = self.params
        if self.kind == "fixed":
            x = p[0]
        elif self.kind == "uniform":
            x = rng.randint(int(p[0]), int(p[1]))
        elif self.kind == "lognormal":
            x = rng.lognormvariate(math.log(p[0]), p[1])
        else:
            x = rng.expovariate(1.0 / p[0])
        x = max(1, round(x))
        cap = {"lognormal": 3, "exponential": 2}.get(self.kind)
        if cap is not None and len(p) == cap:
            x = min(x, int(p[-1]))
        return int(x)


WORDS = (
    "order invoice refund parcel contract clause build test dose report delivery account payment "
    "schedule release patient warranty ticket summary meeting question answer customer support "
    "legal code medicine policy review change request status update"
).split()


def prompt_text(rng: random.Random, words: int) -> str:
    """About `words` tokens of text for the built-in model's tokenizer (one word is 1-2 tokens;
    the server's `usage.prompt_tokens` is what the report counts)."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, words)))


# ---- shapes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    users: int
    spawn_rate: float
    rate: float | None = None  # Poisson: requests/s offered by all users together; else closed loop


@dataclass(frozen=True)
class Shape:
    """A rate shape from a spec string `kind[:key=value,...]`:

    constant:users=8,duration=300            closed loop: `users` streams, each sends its next
                                             request when the last ends (plus think time)
    step:start=2,step=2,every=60,max=16,duration=300
                                             closed loop, `step` more users every `every` s
    poisson:rate=2,users=32,duration=300     open loop: arrivals at `rate`/s (Poisson), sent by a
                                             pool of `users` (arrivals while all are busy are late)
    poisson:rate=1,step=1,every=60,max=4,duration=300   the same with the rate stepped up

    `spawn_rate` (users/s) defaults to all at once. `plan(t)` is the stage at `t` seconds into
    the run, None once `duration` is over (Locust then stops)."""

    kind: str
    params: dict[str, float] = field(default_factory=dict)

    DEFAULTS = {
        "constant": {"users": 8, "duration": 300},
        "step": {"start": 2, "step": 2, "every": 60, "max": 16, "duration": 300},
        "poisson": {"rate": 2, "users": 32, "duration": 300, "step": 0, "every": 60, "max": 0},
    }

    @classmethod
    def parse(cls, spec: str) -> Shape:
        kind, _, rest = spec.strip().partition(":")
        if kind not in cls.DEFAULTS:
            raise ValueError(f"shape {spec!r}: kind must be one of {list(cls.DEFAULTS)}")
        params = dict(cls.DEFAULTS[kind])
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or key not in {*params, "spawn_rate"}:
                allowed = sorted({*params, "spawn_rate"})
                raise ValueError(f"shape {spec!r}: {item!r} is not one of {allowed} = number")
            try:
                params[key] = float(value)
            except ValueError:
                raise ValueError(f"shape {spec!r}: {key} must be a number") from None
        if any(v < 0 for v in params.values()) or params["duration"] <= 0:
            raise ValueError(f"shape {spec!r}: values must be >= 0 and duration > 0")
        if kind == "step" and params["every"] <= 0:
            raise ValueError(f"shape {spec!r}: every must be > 0")
        if kind == "poisson" and (params["rate"] <= 0 or params["users"] < 1):
            raise ValueError(f"shape {spec!r}: rate must be > 0 and users >= 1")
        return cls(kind, params)

    @property
    def duration(self) -> float:
        return self.params["duration"]

    def plan(self, t: float) -> Stage | None:
        p = self.params
        if t >= p["duration"]:
            return None
        if self.kind == "constant":
            users = int(p["users"])
            return Stage(users, p.get("spawn_rate", users))
        if self.kind == "step":
            steps = int(t // p["every"])
            users = int(min(p["max"], p["start"] + steps * p["step"]))
            return Stage(users, p.get("spawn_rate", max(users, 1)))
        rate = p["rate"]
        if p["step"] > 0:
            rate = rate + int(t // p["every"]) * p["step"]
            if p["max"] > 0:
                rate = min(rate, p["max"])
        users = int(p["users"])
        return Stage(users, p.get("spawn_rate", users), rate)

    def stages(self) -> list[tuple[float, Stage]]:
        """(start time, stage) at every change, for plots."""
        out: list[tuple[float, Stage]] = []
        every = self.params.get("every", self.duration) or self.duration
        t = 0.0
        while t < self.duration:
            stage = self.plan(t)
            if not out or out[-1][1] != stage:
                out.append((t, stage))
            t += every
        return out


class PoissonClock:
    """One user's share of a Poisson arrival process: the superposition of `users` independent
    clocks of rate `rate / users` is a Poisson process of rate `rate`.

    `wait(now, rate, users)`: seconds until this clock's next arrival (0: it is due, or overdue
    when the user was still busy with the previous request; it is then sent late,
    `now - next_at`). When the rate differs from the one the pending arrival was drawn with, the
    pending arrival is drawn afresh from `now` with the new rate (exact for a Poisson process,
    which is memoryless), so a step in the rate takes effect at once. `sent()` after each arrival
    sent schedules the next one."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.next_at = 0.0
        self.per_user: float | None = None

    def wait(self, now: float, rate: float, users: int) -> float:
        per_user = rate / users
        if per_user != self.per_user:
            if self.per_user is None or self.next_at > now:
                self.next_at = now + self.rng.expovariate(per_user)
            self.per_user = per_user
        return max(0.0, self.next_at - now)

    def sent(self) -> None:
        assert self.per_user is not None, "wait() first"
        self.next_at += self.rng.expovariate(self.per_user)


# ---- the per-request record --------------------------------------------------------------------

FIELDS = (
    "start",  # unix time the request was sent
    "tenant",
    "rank",  # Zipf rank, 1 = most popular
    "model",
    "status",  # ok, http_<code>, error_event, bad_stream, <exception name>
    "prompt_tokens",
    "completion_tokens",
    "max_tokens",
    "ttft_s",  # to the first content event
    "e2e_s",
    "late_s",  # Poisson shape: how late the arrival was sent
    "events",  # "<ms after start>:<completion tokens in it>" per content event, space-separated
)


@dataclass
class RequestRecord:
    start: float
    tenant: str
    rank: int
    model: str
    max_tokens: int
    status: str = "pending"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    late_s: float = 0.0
    events: list[tuple[float, int]] = field(default_factory=list)  # (s after start, tokens)

    def row(self) -> dict:
        return {
            "start": f"{self.start:.6f}",
            "tenant": self.tenant,
            "rank": self.rank,
            "model": self.model,
            "status": self.status,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "max_tokens": self.max_tokens,
            "ttft_s": "" if self.ttft_s is None else f"{self.ttft_s:.6f}",
            "e2e_s": "" if self.e2e_s is None else f"{self.e2e_s:.6f}",
            "late_s": f"{self.late_s:.4f}",
            "events": " ".join(f"{t * 1000:.1f}:{n}" for t, n in self.events),
        }

    @classmethod
    def from_row(cls, row: dict) -> RequestRecord:
        events = []
        for item in (row.get("events") or "").split():
            ms, _, n = item.partition(":")
            events.append((float(ms) / 1000, int(n)))
        return cls(
            start=float(row["start"]),
            tenant=row["tenant"],
            rank=int(row["rank"]),
            model=row["model"],
            max_tokens=int(row["max_tokens"]),
            status=row["status"],
            prompt_tokens=int(row["prompt_tokens"] or 0),
            completion_tokens=int(row["completion_tokens"] or 0),
            ttft_s=float(row["ttft_s"]) if row["ttft_s"] else None,
            e2e_s=float(row["e2e_s"]) if row["e2e_s"] else None,
            late_s=float(row.get("late_s") or 0),
            events=events,
        )

    def itls(self) -> list[float]:
        """Inter-token latencies (s): the gap before each content event after the first, shared
        by the tokens that event carries (the server sends several events at once when the client
        lags; each token's share of the gap is then small)."""
        out = []
        for (t0, _), (t1, n) in zip(self.events, self.events[1:], strict=False):
            out += [(t1 - t0) / n] * n if n > 0 else []
        return out

    def tpot_s(self) -> float | None:
        """Time per output token after the first: (last event - first event) / (tokens - 1)."""
        tokens = sum(n for _, n in self.events)
        if len(self.events) < 2 or tokens < 2:
            return None
        return (self.events[-1][0] - self.events[0][0]) / (tokens - 1)


def read_records(path) -> list[RequestRecord]:
    with open(path, newline="") as f:
        return [RequestRecord.from_row(row) for row in csv.DictReader(f)]
