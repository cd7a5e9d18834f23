"""A/B of Ray Serve settings given as environment variables: the app (`compare.py`'s system,
HAProxy front by default) restarted once per arm with that arm's variables in the environment
of `serve run` (Ray's processes inherit them), the same `vllm bench serve` client each time.

    .venv/bin/python -m benchmarks.serving.ab_env \\
        --arm base= \\
        --arm grpc=RAY_SERVE_USE_GRPC_BY_DEFAULT=1 \\
        --arm same-loop=RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0,RAY_SERVE_FREEZE_GC_ON_STARTUP=1 \\
        --order base,same-loop,grpc,base

Each arm: start, one warm-up run (128 requests), then base model at rate inf twice and at 4 in
flight once (256 requests each), with the CPU seconds of every process of the app per run
(compare.py's `cpu_s`). Arms restart the whole app, so list them interleaved (a,b,a,b) to see
the machine's drift. Prints every run and the medians; writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.serving import compare, process_cpu

LOADS = ("rate=inf", "rate=inf", "conc=4")


def parse_arm(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition("=")
    env = dict(a.split("=", 1) for a in assignments.split(",") if a)
    return name, env


def wait_ports_free(ports: tuple[int, ...], timeout_s: float = 90.0) -> None:
    """Until nothing listens on `ports`: a stopped app's HAProxy can hold its stats and metrics
    ports for a while (docs/operations.md), and the next arm's HAProxy would fail to start."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = []
        for port in ports:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    busy.append(port)
        if not busy:
            return
        time.sleep(2)
    raise TimeoutError(f"ports {busy} still in use after {timeout_s}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", default="app-haproxy")
    parser.add_argument("--arm", action="append", required=True, help="NAME=VAR=VAL,VAR=VAL")
    parser.add_argument("--order", required=True, help="arm names, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ab_env.json"))
    args = parser.parse_args()
    arms = dict(parse_arm(a) for a in args.arm)
    port = 8100
    runs: dict[str, dict[str, list[dict]]] = {}
    for i, arm in enumerate(args.order.split(",")):
        saved = dict(os.environ)
        os.environ.update(arms[arm])
        log = Path(tempfile.gettempdir()) / f"ab_env_{i}.log"
        try:
            proc = compare.start(args.system, port, log)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        try:
            base, adapters = compare.model_names(args.system)
            compare.wait_ready(port, adapters[0])
            compare.bench(port, base, [], "rate=inf", seed=99, prompts=128)  # warm-up
            for seed, load in enumerate(LOADS):
                cpu_before, since = compare.cpu_snapshot(proc), time.time()
                run = compare.bench(port, base, [], load, seed=seed, prompts=256)
                run["cpu_s"] = process_cpu.cpu_used(cpu_before, compare.cpu_snapshot(proc), since)
                print(i, arm, load, compare.summary(run), flush=True)
                run.pop("requests")
                runs.setdefault(f"{i} {arm}", {}).setdefault(load, []).append(run)
        finally:
            compare.stop(proc)
            wait_ports_free((port, 8404, 9101))
    args.out.write_text(json.dumps({"arms": arms, "runs": runs}, indent=1))
    for arm, by_load in runs.items():
        for load, load_runs in by_load.items():
            med = {m: statistics.median(r[m] for r in load_runs) for m in compare.METRICS}
            med["CPU s"] = statistics.median(sum(r["cpu_s"].values()) for r in load_runs)
            print(f"{arm:24s} {load:9s} " + "  ".join(f"{m} {v:.1f}" for m, v in med.items()))


if __name__ == "__main__":
    main()
