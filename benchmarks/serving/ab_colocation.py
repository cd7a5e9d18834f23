"""A/B of the EngineCore placement (app/replica_env.py colocate_engine_core) on ONE running
system: `vllm bench serve` runs alternate between the EngineCore where vLLM leaves it (spread
over every core) and on its worker's cores, switched live between runs, so both arms share
the process, the warm-up and the machine's drift.

    .venv/bin/python -m benchmarks.serving.ab_colocation --system app-haproxy --pairs 4

The system starts with the placement off (`app...+spread`; plain `vllm` needs no suffix) and
this script moves the EngineCore itself; pairs alternate their order (AB, BA, ...). Scenarios:
base and 1 adapter, at 4 in flight and rate inf (benchmarks/serving/compare.py's client).
Prints the median of each arm per scenario and writes every run to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import psutil

from app.replica_env import ENGINE_CORE_TITLE
from benchmarks.serving import compare

SCENARIOS = (("base", "conc=4"), ("1", "conc=4"), ("base", "rate=inf"), ("1", "rate=inf"))
ARMS = ("spread", "colocated")


def place(proc, arm: str) -> None:
    if arm == "colocated":
        compare.colocate_engine_cores(proc)
        return
    everywhere = set(range(psutil.cpu_count()))
    for p in compare.session_processes(proc):
        if ENGINE_CORE_TITLE in p.name():
            for thread in p.threads():
                os.sched_setaffinity(thread.id, everywhere)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", default="app-haproxy")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ab_colocation.json"))
    args = parser.parse_args()
    started = args.system + ("+spread" if args.system.startswith("app") else "")
    port = 8100
    proc = compare.start(started, port, Path(tempfile.gettempdir()) / "ab_colocation.log")
    runs: dict[str, dict[str, list[dict]]] = {}
    try:
        base, adapters = compare.model_names(args.system)
        compare.wait_ready(port, adapters[0])
        for pair in range(args.pairs):
            for arm in ARMS if pair % 2 == 0 else ARMS[::-1]:
                place(proc, arm)
                for models, load in SCENARIOS:
                    active = [] if models == "base" else adapters[: int(models)]
                    run = compare.bench(port, base, active, load, seed=pair)
                    print(pair, arm, models, load, compare.summary(run), flush=True)
                    run.pop("requests")
                    runs.setdefault(f"{models} {load}", {}).setdefault(arm, []).append(run)
    finally:
        compare.stop(proc)
    args.out.write_text(json.dumps({"system": args.system, "runs": runs}, indent=1))
    for scenario, by_arm in runs.items():
        print(f"\n{scenario} (median of {args.pairs})")
        for arm, arm_runs in by_arm.items():
            med = {m: statistics.median(r[m] for r in arm_runs) for m in compare.METRICS}
            print(f"  {arm:10s} " + "  ".join(f"{m} {v:.1f}" for m, v in med.items()))


if __name__ == "__main__":
    main()
