"""The study: 1,000 tenants on up to 64 GPU replicas (params.h200_qwen3_30b, assumptions there).

1. Replicas needed to hold the SLO (p99 TTFT <= 1 s) at each load, per router: 64 replicas are
   simulated in full; if they hold it, the smallest count of CANDIDATE_REPLICAS that does is
   found by bisection (assumes more replicas never hurt), failing runs stopped early.
2. Autoscaling: a load that steps up and down, our router, the app's UtilizationPolicy against
   Ray Serve's default policy (same target per replica), and a fixed fleet for reference.

Traffic: Poisson, the rate ramped up over the first RAMP_S (caches start empty) while every
tenant sends one short request (traffic.with_warmup), latency counted for arrivals after RAMP_S.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np

from loadtest.simulator.autoscale import AutoscaleConfig
from loadtest.simulator.fleet import Fleet
from loadtest.simulator.params import FleetParams, Scenario, h200_qwen3_30b
from loadtest.simulator.summary import percentile, summarize
from loadtest.simulator.traffic import Workload, generate, with_warmup

SLO_P99_TTFT_S = 1.0
LOADS = (50, 100, 200, 400)  # requests/s
ROUTER_CASES = {
    # name: (router, imbalance_threshold)
    "ours": ("ours", 16),  # serve_config.gpu.yaml
    "ours, threshold 128": ("ours", 128),  # load bound off (= max_ongoing_requests)
    "ray_default": ("ray_default", 16),
    "ray_multiplex": ("ray_multiplex", 16),
}
CANDIDATE_REPLICAS = (2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
RAMP_S = 60.0  # the rate rises from 0; meanwhile every tenant sends one short request
WARMUP_PER_TENANT = 1  # (traffic.with_warmup)
DURATION_S = 120.0  # the ramp, then 60 s measured
MEASURED_FROM_S = RAMP_S
SEED = 1
WORKLOAD = Workload()
# Serve settings from serve_config.gpu.yaml; Ray multiplexing reports as many ids as vLLM's CPU
# cache holds (as in the routing experiment's benchmark subclass).
FLEET = FleetParams(
    max_ongoing_requests=128, imbalance_threshold=16, stats_period_s=2.0,
    multiplex_models_per_replica=64,
)  # fmt: skip
AUTOSCALE_PHASES = (100, 200, 100)  # requests/s, PHASE_S each
AUTOSCALE_PHASE_S = 150.0
AUTOSCALE_START = 32  # what the SLO search found enough at 100 requests/s
# Requests per replica the policies aim at. serve_config.gpu.yaml's 48 would shrink this fleet
# to ~7 replicas (about 150-300 requests are in flight), far too few for 1,000 adapters; 5 is
# roughly what the replica counts that hold the SLO carry (a tuned value, for both policies).
AUTOSCALE_TARGET = 5.0
AUTOSCALE_FIXED = (32, 48)


def scenario(threshold: int) -> Scenario:
    return Scenario(h200_qwen3_30b(), FLEET).with_fleet(imbalance_threshold=threshold)


def traffic(shape: str, duration_s: float, seed: int = SEED) -> list:
    main = generate(WORKLOAD, shape, duration_s, seed)
    return with_warmup(main, WORKLOAD.tenants, RAMP_S, WARMUP_PER_TENANT, seed)


def run_fixed(case: str, load: float, replicas: int, abort: bool, seed: int = SEED) -> dict:
    router, threshold = ROUTER_CASES[case]
    reqs = traffic(f"ramp:{load}:{RAMP_S}", DURATION_S, seed)
    measured = sum(r.arrival >= MEASURED_FROM_S for r in reqs)
    result = Fleet(scenario(threshold), router, replicas, seed=seed).run(
        reqs,
        abort_ttft_s=SLO_P99_TTFT_S if abort else None,
        abort_after=math.ceil(0.01 * measured) + 1,
        abort_count_from_s=MEASURED_FROM_S,
    )
    out = summarize(result, warmup_s=MEASURED_FROM_S)
    out["holds_slo"] = (not out["aborted"]) and out["ttft_p99_s"] <= SLO_P99_TTFT_S
    for key in ("requests_per_replica", "distinct_adapters_per_replica"):
        values = out.pop(key)
        out[key.replace("per_replica", "per_replica_max")] = max(values) if values else 0
    return out


def replicas_for_slo(case: str, load: float) -> dict:
    tried = {64: run_fixed(case, load, 64, abort=False)}
    if tried[64]["holds_slo"]:
        lo, hi = -1, len(CANDIDATE_REPLICAS) - 1  # CANDIDATE_REPLICAS[hi] holds it
        while hi - lo > 1:
            mid = (lo + hi) // 2
            n = CANDIDATE_REPLICAS[mid]
            tried[n] = run_fixed(case, load, n, abort=True)
            lo, hi = (lo, mid) if tried[n]["holds_slo"] else (mid, hi)
        needed = CANDIDATE_REPLICAS[hi]
    else:
        needed = None
    return {
        "case": case,
        "load": load,
        "replicas_needed": needed,
        "at_64": tried[64],
        "tried": {n: {k: r[k] for k in ("ttft_p99_s", "aborted", "holds_slo")}
                  for n, r in sorted(tried.items())},
    }  # fmt: skip


def autoscale_profile() -> tuple[str, float]:
    """The ramp to the first rate, then each rate for AUTOSCALE_PHASE_S, stepping at once."""
    points, t = [(0.0, 0.0)], RAMP_S
    for rate in AUTOSCALE_PHASES:
        points += [(t + 1e-3, rate), (t + AUTOSCALE_PHASE_S, rate)]
        t += AUTOSCALE_PHASE_S
    return "profile:" + ",".join(f"{a:g}={b:g}" for a, b in points), t


def run_autoscaled(policy: str | int) -> dict:
    """policy: a policy name, or a fixed number of replicas."""
    shape, duration = autoscale_profile()
    reqs = traffic(shape, duration)
    cfg, fixed = None, policy if isinstance(policy, int) else 0
    if not fixed:
        cfg = AutoscaleConfig(
            policy=policy, min_replicas=1, max_replicas=64, initial_replicas=AUTOSCALE_START,
            upscale_delay_s=30.0, downscale_delay_s=120.0,
            target_requests_per_replica=AUTOSCALE_TARGET, target_ongoing_requests=AUTOSCALE_TARGET,
        )  # fmt: skip
    result = Fleet(scenario(16), "ours", fixed, seed=SEED, autoscale=cfg).run(reqs)
    out = summarize(result, warmup_s=RAMP_S)
    phases = []
    for i, rate in enumerate(AUTOSCALE_PHASES):
        t0 = RAMP_S + i * AUTOSCALE_PHASE_S
        t1 = t0 + AUTOSCALE_PHASE_S
        ttft = [
            (r.first_token - r.arrival + result.overhead_s) if r.first_token >= 0 else math.inf
            for r in reqs
            if t0 <= r.arrival < t1
        ]
        before = [n for t, n in result.replica_timeline if t <= t0][-1:]
        counts = before + [n for t, n in result.replica_timeline if t0 < t < t1]
        phases.append({
            "rate": rate,
            "ttft_p50_s": percentile(np.array(ttft), 50),
            "ttft_p99_s": percentile(np.array(ttft), 99),
            "replicas_min_max": [min(counts), max(counts)],
        })  # fmt: skip
    for key in ("requests_per_replica", "distinct_adapters_per_replica"):
        out.pop(key)
    return {
        "policy": f"fixed {fixed}" if fixed else policy,
        "overall": out,
        "phases": phases,
        "timeline": [(round(t, 1), n) for t, n in result.replica_timeline],
    }


SENSITIVITY_LOAD = 100
SENSITIVITY_DISK_LOAD_S = (0.2, 0.83)  # 0.2 s: a re-read from the page cache, say


def run_sensitivity(args) -> dict:
    """One 64-replica run at SENSITIVITY_LOAD with another disk-load time."""
    case, disk_load_s = args
    router, threshold = ROUTER_CASES[case]
    sc = scenario(threshold)
    sc = replace(sc, engine=replace(sc.engine, disk_load_s=disk_load_s))
    reqs = traffic(f"ramp:{SENSITIVITY_LOAD}:{RAMP_S}", DURATION_S)
    out = summarize(Fleet(sc, router, 64, seed=SEED).run(reqs), warmup_s=MEASURED_FROM_S)
    keep = ("ttft_p50_s", "ttft_p99_s", "itl_p99_s", "disk_loads", "slot_loads")
    return {"case": case, "disk_load_s": disk_load_s} | {k: out[k] for k in keep}


def _search(args):
    return replicas_for_slo(*args)


def _at_64(args):
    case, load, seed = args
    r = run_fixed(case, load, 64, abort=False, seed=seed)
    keep = ("ttft_p50_s", "ttft_p99_s", "disk_loads", "slot_loads", "replicas_used")
    return {"case": case, "load": load, "seed": seed} | {k: r[k] for k in keep}


def run_seeds(jobs: int = 2, seeds=(2, 3), loads=LOADS, cases=tuple(ROUTER_CASES)) -> dict:
    """The 64-replica runs again with other seeds (traffic and Ray's random draws): how much
    of the differences between routers is one seed's luck."""
    combos = [(c, load, s) for s in seeds for load in loads for c in cases if c != "ray_default"]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return {"seeds": seeds, "runs": list(pool.map(_at_64, combos))}


def run_study(jobs: int = 2, loads=LOADS, cases=tuple(ROUTER_CASES)) -> dict:
    combos = [(case, load) for load in loads for case in cases]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        slo = list(pool.map(_search, combos))
        autoscale = list(pool.map(run_autoscaled, ["utilization", "ray_default", *AUTOSCALE_FIXED]))
        sensitivity = list(pool.map(
            run_sensitivity, [(c, d) for d in SENSITIVITY_DISK_LOAD_S for c in cases]
        ))  # fmt: skip
    return {
        "slo": f"p99 TTFT <= {SLO_P99_TTFT_S} s",
        "workload": WORKLOAD.__dict__,
        "traffic": f"Poisson ramped from 0 to the rate over {RAMP_S:.0f} s, while every tenant "
        f"also sends {WARMUP_PER_TENANT} short request (128 prompt, 16 output tokens); "
        f"{DURATION_S:.0f} s in all; latency of arrivals after {MEASURED_FROM_S:.0f} s; "
        f"seed {SEED}",
        "fleet": FLEET.__dict__,
        "engine": "params.h200_qwen3_30b",
        "engine_params": {k: v for k, v in h200_qwen3_30b().__dict__.items() if k != "step"}
        | {"step": {k: v for k, v in h200_qwen3_30b().step.__dict__.items()}},
        "replicas_for_slo": slo,
        "disk_load_sensitivity": {
            "load": SENSITIVITY_LOAD,
            "replicas": 64,
            "runs": sensitivity,
        },
        "autoscaling": {
            "phases_req_per_s": AUTOSCALE_PHASES,
            "profile": autoscale_profile()[0],
            "phase_s": AUTOSCALE_PHASE_S,
            "router": "ours, threshold 16",
            "config": f"min 1, max 64, start {AUTOSCALE_START}, upscale_delay 30 s, "
            f"downscale_delay 120 s, target {AUTOSCALE_TARGET:g} requests per replica (both "
            f"policies), replica start {FLEET.replica_start_s:g} s",
            "runs": autoscale,
        },
    }


def tables(study: dict) -> str:
    lines = [f"Replicas needed for {study['slo']} (of {CANDIDATE_REPLICAS}; '>64': not even 64)"]
    cases = list(dict.fromkeys(r["case"] for r in study["replicas_for_slo"]))
    loads = list(dict.fromkeys(r["load"] for r in study["replicas_for_slo"]))
    by = {(r["case"], r["load"]): r for r in study["replicas_for_slo"]}
    lines.append("| router | " + " | ".join(f"{load} req/s" for load in loads) + " |")
    lines.append("|---" * (len(loads) + 1) + "|")
    for case in cases:
        cells = [by[case, load]["replicas_needed"] for load in loads]
        lines.append(f"| {case} | " + " | ".join(str(c) if c else ">64" for c in cells) + " |")
    lines.append("")
    lines.append("At 64 replicas")
    head = (
        "load",
        "router",
        "TTFT p50 / p99 (s)",
        "ITL p50 / p99 (ms)",
        "tokens/s",
        "disk loads",
        "slot loads",
        "max adapters on a replica",
        "max requests on a replica",
    )
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|---" * len(head) + "|")
    for load in loads:
        for case in cases:
            r = by[case, load]["at_64"]
            lines.append(
                f"| {load} | {case} | {r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} | "
                f"{1000 * r['itl_p50_s']:.1f} / {1000 * r['itl_p99_s']:.1f} | "
                f"{r['tokens_per_s']:.0f} | {r['disk_loads']} | {r['slot_loads']} | "
                f"{r['distinct_adapters_per_replica_max']} | {r['requests_per_replica_max']} |"
            )
    sens = study["disk_load_sensitivity"]
    lines.append("")
    lines.append(f"Disk-load time sensitivity ({sens['load']} req/s, {sens['replicas']} replicas)")
    lines.append("| router | disk load s | TTFT p50 / p99 (s) | ITL p99 (ms) | disk / slot loads |")
    lines.append("|---|---|---|---|---|")
    for r in sens["runs"]:
        lines.append(
            f"| {r['case']} | {r['disk_load_s']} | {r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} "
            f"| {1000 * r['itl_p99_s']:.0f} | {r['disk_loads']} / {r['slot_loads']} |"
        )
    a = study["autoscaling"]
    lines.append("")
    lines.append(f"Autoscaling ({a['router']}; {a['config']}); phases {a['phases_req_per_s']} "
                 f"req/s, {a['phase_s']:.0f} s each")  # fmt: skip
    lines.append("| policy | " + " | ".join(
        f"phase {p} req/s: TTFT p50 / p99 (s), replicas" for p in a["phases_req_per_s"]
    ) + " | replica-seconds | disk loads |")  # fmt: skip
    lines.append("|---" * (len(a["phases_req_per_s"]) + 3) + "|")
    for run in a["runs"]:
        cells = [
            f"{p['ttft_p50_s']:.3f} / {p['ttft_p99_s']:.3f}, {p['replicas_min_max'][0]}-"
            f"{p['replicas_min_max'][1]}"
            for p in run["phases"]
        ]
        o = run["overall"]
        lines.append(f"| {run['policy']} | " + " | ".join(cells)
                     + f" | {o['replica_seconds']:.0f} | {o['disk_loads']} |")  # fmt: skip
    return "\n".join(lines)
