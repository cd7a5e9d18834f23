"""Arrivals: the routing experiment's exact seeded traffic, or generated traffic (Zipf tenants,
Poisson / constant / step rates, lognormal prompts and outputs) drawn with numpy."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from loadtest.simulator.params import prompt_tokens
from loadtest.workload import LengthDist, ZipfSampler, prompt_text, zipf_weights


class Request:
    """One request and what happened to it (times in seconds from the start)."""

    __slots__ = (
        "rid", "arrival", "adapter", "prompt", "output", "replica", "prefill_left",
        "finish_step", "first_token", "done", "tier",
    )  # fmt: skip

    def __init__(self, rid: int, arrival: float, adapter: int, prompt: int, output: int):
        self.rid = rid
        self.arrival = arrival
        self.adapter = adapter
        self.prompt = prompt
        self.output = output
        self.replica = -1
        self.prefill_left = prompt
        self.finish_step = 0  # the replica's decode-step count at which it is done
        self.first_token = -1.0
        self.done = -1.0
        self.tier = ""  # our router: accelerator / cpu / cold


# ---- the routing experiment (benchmarks/routing/experiment.py), replayed exactly ----------------

ROUTING_SEED = 12
ROUTING_TENANTS = 16
ROUTING_ZIPF_S = 1.1


def routing_experiment_traffic(duration_s: float = 90.0, rate: float = 2.0) -> list[Request]:
    """The same draws, in the same order, from the same seeds as experiment.schedule(), so the
    arrival times, tenants, prompt lengths and max_tokens are identical (tests check it)."""
    rng = random.Random(ROUTING_SEED)
    zipf = ZipfSampler(ROUTING_TENANTS, ROUTING_ZIPF_S, random.Random(ROUTING_SEED + 1))
    words = LengthDist.parse("lognormal:24:0.5:100")
    outputs = LengthDist.parse("uniform:16:48")
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        adapter = zipf()
        n_words = words.sample(rng)
        prompt_text(rng, n_words)  # consumes the same random draws as the real schedule
        out.append(Request(len(out), t, adapter, prompt_tokens(n_words), outputs.sample(rng)))


# ---- generated traffic --------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    tenants: int = 1000
    zipf_s: float = 1.1
    prompt_median: float = 512
    prompt_sigma: float = 0.8
    prompt_max: int = 4096
    output_median: float = 128
    output_sigma: float = 0.6
    output_max: int = 1024


def arrival_times(shape: str, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """`poisson:RATE`, `constant:RATE` (evenly spaced), `step:R1,R2,...` (Poisson, the
    duration split evenly between the rates), `ramp:RATE:SECONDS` (Poisson, the rate rising
    linearly from 0 to RATE over SECONDS, then constant: a fleet that starts with empty
    adapter caches is not hit by the full load at once) or `profile:T1=R1,T2=R2,...` (Poisson,
    the rate linear between the points; a repeated time makes a step)."""
    kind, _, arg = shape.partition(":")
    if kind == "constant":
        rate = float(arg)
        return np.arange(1, int(duration_s * rate) + 1) / rate
    if kind in ("ramp", "profile"):
        if kind == "ramp":
            rate, ramp_s = (float(x) for x in arg.split(":"))
            points = [(0.0, 0.0), (ramp_s, rate)]
        else:
            points = [tuple(float(x) for x in p.split("=")) for p in arg.split(",")]
        ts, rs = np.array(points).T
        peak = rs.max()
        times = np.sort(rng.uniform(0, duration_s, rng.poisson(peak * duration_s)))
        keep = rng.random(len(times)) * peak < np.interp(times, ts, rs)  # thinning
        return times[keep]
    rates = [float(r) for r in arg.split(",")] if kind == "step" else [float(arg)]
    if kind not in ("poisson", "step"):
        raise ValueError(f"unknown rate shape {shape!r}")
    span = duration_s / len(rates)
    parts = []
    for i, rate in enumerate(rates):
        n = rng.poisson(rate * span)
        parts.append(np.sort(rng.uniform(i * span, (i + 1) * span, n)))
    return np.concatenate(parts)


def generate(workload: Workload, shape: str, duration_s: float, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    times = arrival_times(shape, duration_s, rng)
    n = len(times)
    cum = np.cumsum(zipf_weights(workload.tenants, workload.zipf_s))
    adapters = np.minimum(np.searchsorted(cum, rng.random(n), side="right"), workload.tenants - 1)
    prompts = np.clip(
        np.rint(rng.lognormal(np.log(workload.prompt_median), workload.prompt_sigma, n)),
        1, workload.prompt_max,
    ).astype(int)  # fmt: skip
    outputs = np.clip(
        np.rint(rng.lognormal(np.log(workload.output_median), workload.output_sigma, n)),
        1, workload.output_max,
    ).astype(int)  # fmt: skip
    return [
        Request(i, float(t), int(a), int(p), int(o))
        for i, (t, a, p, o) in enumerate(zip(times, adapters, prompts, outputs, strict=True))
    ]


def with_warmup(
    main: list[Request], tenants: int, seconds: float, per_tenant: int, seed: int
) -> list[Request]:
    """`main` plus `per_tenant` short requests of every tenant spread at random over its first
    `seconds` (meant to overlap its ramp-up): every adapter has been requested, and placed by
    the router under test under rising load, before the measured part, as in a fleet that has
    run for a while. Without it most of the long tail's requests in a short run are the
    tenant's first, so cold by construction."""
    rng = np.random.default_rng(seed + 7919)
    adapters = np.repeat(np.arange(tenants), per_tenant)
    rng.shuffle(adapters)
    times = rng.uniform(0, seconds, len(adapters))
    first = len(main)
    warm = [
        Request(first + i, float(t), int(a), 128, 16)
        for i, (t, a) in enumerate(zip(times, adapters, strict=True))
    ]
    return sorted(main + warm, key=lambda r: r.arrival)
