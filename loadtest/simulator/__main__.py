"""python -m loadtest.simulator [validate|study|all] [--jobs 2] [--out-dir loadtest/results]

validate: the 2-replica routing experiment replayed (seconds); study: 1,000 tenants on up to 64
GPU replicas (~3 minutes on 2 cores with --jobs 2); all: both. seeds (not in all): the study's
64-replica runs with two more seeds (~2 minutes). Each writes its JSON to --out-dir and prints
its tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy

from loadtest.simulator import study, validate

ROOT = Path(__file__).resolve().parents[2]


def provenance(started: float) -> dict:
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or ''}, "
        f"1-min load average {os.getloadavg()[0]:.1f}",
        "versions": {"python": platform.python_version(), "numpy": numpy.__version__},
        "commit": commit,
        "run_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ("validate", "study", "seeds", "all")
    parser.add_argument("what", nargs="?", default="all", choices=what)
    parser.add_argument("--jobs", type=int, default=2, help="processes for the study")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "loadtest/results")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M", time.gmtime())
    if args.what in ("validate", "all"):
        started = time.monotonic()
        result = validate.run_validation()
        result["provenance"] = provenance(started)
        out = args.out_dir / f"simulator_validation_{stamp}.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"slowdown fitted on {result['fit_run']}: {result['slowdown']}")
        print(validate.table(result))
        sat = result["loadtest_saturation_check"]
        print(
            f"one replica, docs/loadtest.md's steps: measured tokens/s "
            f"{sat['measured']['tokens_per_s']}, TTFT p50 {sat['measured']['ttft_p50_s']}"
        )
        for sim in sat["simulated"]:
            print(f"  simulated, slowdown {sim['slowdown']}: tokens/s {sim['tokens_per_s']}, "
                  f"TTFT p50 {sim['ttft_p50_s']}")  # fmt: skip
        print(f"within target: {result['within_target']}; written to {out}\n", flush=True)
    if args.what in ("study", "all"):
        started = time.monotonic()
        result = study.run_study(jobs=args.jobs)
        result["provenance"] = provenance(started)
        out = args.out_dir / f"simulator_study_{stamp}.json"
        out.write_text(json.dumps(result, indent=1) + "\n")  # an unserved request: Infinity
        print(study.tables(result))
        print(f"written to {out} ({result['provenance']['run_s']:.0f} s)")
    if args.what == "seeds":
        started = time.monotonic()
        result = study.run_seeds(jobs=args.jobs)
        result["provenance"] = provenance(started)
        out = args.out_dir / f"simulator_seeds_{stamp}.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        for r in result["runs"]:
            print(r)
        print(f"written to {out}")


if __name__ == "__main__":
    main()
