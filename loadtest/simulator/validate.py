"""The simulator against the routing experiment (benchmarks/routing/results/*.json): the same
2 CPU replicas, 16 adapters, max_loras 4, max_cpu_loras 8 and the same seeded traffic.

Fitting and validation data are kept apart:
- the engine's costs come from single-replica runs (params.cpu_builtin, never these runs);
- one factor, `slowdown` (two busy-polling vLLM workers and the Ray path sharing 2 cores
  instead of one worker), is fitted to one run's p50 TTFT: FIT_RUN;
- the other five runs validate: p50 TTFT and tokens/s (the issue's 15% target), and, not
  fitted at all, vLLM's disk and slot loads, requests and distinct adapters per replica.
Ray's routers draw at random (power of two choices), so their runs are simulated with several
seeds: the median, and the range.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path
from statistics import median

from loadtest.simulator.fleet import Fleet
from loadtest.simulator.params import FleetParams, Scenario, cpu_builtin, prompt_tokens
from loadtest.simulator.summary import summarize
from loadtest.simulator.traffic import Request, routing_experiment_traffic
from loadtest.workload import LengthDist, ZipfSampler

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks/routing/results"
FIT_RUN = "ray_multiplex_20261130_0321.json"  # set 1, the least loaded machine of that set
ROUTER_NAMES = {"adapter_affinity": "ours", "ray_default": "ray_default",
                "ray_multiplex": "ray_multiplex"}  # fmt: skip
SEEDS = range(10)
# A run whose machine had a 1-min load average at least this high (other jobs on the 2 cores)
BUSY_LOAD_AVERAGE = 40.0
TARGET = 0.15


# The load bound of runs that recorded none: the app's default until stop 22 (since then the
# experiment records the bound its app ran with, 1/8 of max_num_seqs 16 = 2 by default).
RECORDED_NONE_THRESHOLD = 8


def experiment_fleet(slowdown: float, threshold: int = RECORDED_NONE_THRESHOLD) -> Scenario:
    # benchmarks/routing/experiment.py app_args: max_ongoing_requests 64
    return Scenario(
        cpu_builtin(slowdown),
        FleetParams(max_ongoing_requests=64, imbalance_threshold=threshold),
    )


def simulate(router: str, slowdown: float, threshold: int = RECORDED_NONE_THRESHOLD) -> list[dict]:
    return [
        summarize(Fleet(experiment_fleet(slowdown, threshold), router, 2, seed=s).run(
            routing_experiment_traffic()))
        for s in (SEEDS if router != "ours" else [0])  # ours draws nothing at random
    ]  # fmt: skip


def fit_slowdown(measured_p50: float, router: str) -> float:
    """Bisection on the factor until the simulated p50 TTFT (median over seeds) matches."""
    lo, hi = 1.0, 4.0
    for _ in range(30):
        mid = (lo + hi) / 2
        p50 = median(s["ttft_p50_s"] for s in simulate(router, mid))
        lo, hi = (mid, hi) if p50 < measured_p50 else (lo, mid)
    return round((lo + hi) / 2, 3)


def load_average(run: dict) -> float | None:
    m = re.search(r"load average after the run ([\d.]+)", run.get("machine", ""))
    return float(m.group(1)) if m else None


def recorded_threshold(run: dict) -> int:
    bound = run["parameters"].get("imbalance_threshold")
    return RECORDED_NONE_THRESHOLD if bound is None else bound


def measured_row(name: str, run: dict) -> dict:
    c = run["client"]
    return {
        "file": name,
        "router": ROUTER_NAMES[run["router"]],
        "imbalance_threshold": recorded_threshold(run),
        "load_average_after": load_average(run),
        "ttft_p50_s": c["ttft_p50_s"],
        "ttft_p90_s": c["ttft_p90_s"],
        "ttft_p99_s": c["ttft_p99_s"],
        "tokens_per_s": c["tokens_per_s"],
        "window_s": c["window_s"],
        "disk_loads": run["vllm_loads"]["cpu_cache_loads"],
        "slot_loads": run["vllm_loads"]["slot_loads"],
        "registrations": int(
            run["our_counters"].get("ray_moelora_adapter_loads_total", {}).get("loaded", 0)
        ),
        "routing_tiers": run["our_counters"].get("ray_moelora_routing_decisions_total"),
        "requests_per_replica": sorted(v["requests"] for v in c["per_replica"].values()),
        "distinct_adapters_per_replica": sorted(
            v["distinct_adapters"] for v in c["per_replica"].values()
        ),
    }


def sim_row(sims: list[dict]) -> dict:
    def med(key):
        return median(s[key] for s in sims)

    def rng(key):
        return [min(s[key] for s in sims), max(s[key] for s in sims)]

    first = sims[0]
    return {
        "seeds": len(sims),
        **{k: med(k) for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tokens_per_s",
                               "window_s", "itl_p50_s", "disk_loads", "slot_loads",
                               "registrations")},
        "disk_loads_range": rng("disk_loads"),
        "slot_loads_range": rng("slot_loads"),
        "requests_per_replica_seed0": sorted(first["requests_per_replica"]),
        "distinct_adapters_per_replica_seed0": sorted(first["distinct_adapters_per_replica"]),
        "routing_tiers": first.get("routing_tiers"),
    }  # fmt: skip


def error(sim: float, measured: float) -> float:
    return round((sim - measured) / measured, 3)


def run_validation() -> dict:
    runs = {p.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    fit = measured_row(FIT_RUN, runs[FIT_RUN])
    slowdown = fit_slowdown(fit["ttft_p50_s"], fit["router"])
    rows = []
    for name, run in runs.items():
        m = measured_row(name, run)
        prior = sim_row(simulate(m["router"], 1.0, m["imbalance_threshold"]))
        sim = sim_row(simulate(m["router"], slowdown, m["imbalance_threshold"]))
        busy = (m["load_average_after"] or 0) >= BUSY_LOAD_AVERAGE
        rows.append({
            "role": "fit" if name == FIT_RUN else "validation",
            "busy_machine": busy,
            "measured": m,
            "simulated": sim,
            "simulated_unfitted": prior,
            "error": {
                "ttft_p50": error(sim["ttft_p50_s"], m["ttft_p50_s"]),
                "tokens_per_s": error(sim["tokens_per_s"], m["tokens_per_s"]),
                "ttft_p50_unfitted": error(prior["ttft_p50_s"], m["ttft_p50_s"]),
                "disk_loads": error(sim["disk_loads"], m["disk_loads"]),
                "slot_loads": error(sim["slot_loads"], m["slot_loads"]),
            },
        })  # fmt: skip
    held_out = [r for r in rows if r["role"] == "validation"]
    saturation = {
        "measured": {"sent_per_step": LOADTEST_SENT, "tokens_per_s": LOADTEST_TOKENS_PER_S,
                     "ttft_p50_s": LOADTEST_TTFT_P50_S},
        "simulated": [saturation_check(1.0), saturation_check(slowdown)],
    }  # fmt: skip
    return {
        "fit_run": FIT_RUN,
        "slowdown": slowdown,
        "engine": "params.cpu_builtin (docs/tenancy.md flood, docs/serving.md), times slowdown",
        "target": f"|error| <= {TARGET:.0%} on p50 TTFT and tokens/s",
        "within_target": {
            "all_validation_runs": all(
                abs(r["error"]["ttft_p50"]) <= TARGET and abs(r["error"]["tokens_per_s"]) <= TARGET
                for r in held_out
            ),
            "validation_runs_on_a_quiet_machine": all(
                abs(r["error"]["ttft_p50"]) <= TARGET and abs(r["error"]["tokens_per_s"]) <= TARGET
                for r in held_out
                if not r["busy_machine"]
            ),
        },
        "runs": rows,
        "loadtest_saturation_check": saturation,
    }


# docs/loadtest.md's one-replica run (2026-11-30 02:49, serve_config.yaml: max_num_seqs 32,
# 16 tenants, Zipf 1.1): requests sent and output tokens/s per 50 s step of its Poisson shape,
# TTFT p50 per step. The machine had a load average of 56-121 then, and a pool of 64 Locust
# users capped the requests in flight: a check of where throughput saturates, not a validation.
LOADTEST_SENT = (66, 121, 158, 188, 234, 229)
LOADTEST_TOKENS_PER_S = (95, 161, 218, 249, 299, 266)
LOADTEST_TTFT_P50_S = (0.18, 0.26, 0.23, 1.35, 3.42, 8.35)
LOADTEST_STEP_S = 50.0


def loadtest_traffic(seed: int = 0) -> list[Request]:
    """Poisson at each step's sent rate, the run's tenant and length distributions."""
    rng = random.Random(seed)
    zipf = ZipfSampler(16, 1.1, random.Random(seed + 1))
    words, outputs = LengthDist.parse("lognormal:24:0.5:200"), LengthDist.parse("uniform:16:128")
    reqs: list[Request] = []
    for i, sent in enumerate(LOADTEST_SENT):
        t, end = i * LOADTEST_STEP_S, (i + 1) * LOADTEST_STEP_S
        while (t := t + rng.expovariate(sent / LOADTEST_STEP_S)) < end:
            reqs.append(Request(len(reqs), t, zipf(), prompt_tokens(words.sample(rng)),
                                outputs.sample(rng)))  # fmt: skip
    return reqs


def saturation_check(slowdown: float) -> dict:
    engine = replace(cpu_builtin(slowdown), max_num_seqs=32)
    reqs = loadtest_traffic()
    Fleet(Scenario(engine, FleetParams(max_ongoing_requests=128)), "ours", 1).run(reqs)
    tokens, ttft = [], []
    for i in range(len(LOADTEST_SENT)):
        lo, hi = i * LOADTEST_STEP_S, (i + 1) * LOADTEST_STEP_S
        step = [r.first_token - r.arrival + engine.overhead_s for r in reqs if lo <= r.arrival < hi]
        ttft.append(round(median(step), 2))
        # a request's tokens spread evenly from its first token to its end
        made = sum(
            r.output * (min(r.done, hi) - max(r.first_token, lo)) / (r.done - r.first_token)
            for r in reqs
            if r.done > r.first_token and min(r.done, hi) > max(r.first_token, lo)
        )
        tokens.append(round(made / LOADTEST_STEP_S))
    return {"slowdown": slowdown, "tokens_per_s": tokens, "ttft_p50_s": ttft}


def table(result: dict) -> str:
    head = ("run", "role", "load", "p50 TTFT meas/sim (err)", "p99 TTFT meas/sim",
            "tok/s meas/sim (err)", "disk loads meas/sim [range]", "slot loads meas/sim [range]",
            "adapters/replica meas/sim")  # fmt: skip
    lines = [" | ".join(head)]
    for r in result["runs"]:
        m, s, e = r["measured"], r["simulated"], r["error"]
        lines.append(" | ".join([
            m["file"].removesuffix(".json"),
            r["role"] + (" (busy)" if r["busy_machine"] else ""),
            f"{m['load_average_after']:.0f}",
            f"{m['ttft_p50_s']:.3f} / {s['ttft_p50_s']:.3f} ({e['ttft_p50']:+.0%})",
            f"{m['ttft_p99_s']:.2f} / {s['ttft_p99_s']:.2f}",
            f"{m['tokens_per_s']:.1f} / {s['tokens_per_s']:.1f} ({e['tokens_per_s']:+.1%})",
            f"{m['disk_loads']} / {s['disk_loads']:g} {s['disk_loads_range']}",
            f"{m['slot_loads']} / {s['slot_loads']:g} {s['slot_loads_range']}",
            "/".join(map(str, m["distinct_adapters_per_replica"])) + " / "
            + "/".join(map(str, s["distinct_adapters_per_replica_seed0"])),
        ]))  # fmt: skip
    return "\n".join(lines)
