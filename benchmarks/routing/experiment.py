"""Routing experiment (issue 12, item 3): adapter loads, p99 TTFT and tokens/s with our
adapter-aware request router against Ray Serve's default router, measured with the real app.

    .venv/bin/python -m benchmarks.routing.experiment [--routers adapter_affinity,ray_default,
        ray_multiplex] [--duration-s 90] [--rate 2.0] [--out-dir DIR]

For each router, in turn, a fresh local Ray (own temp dir, metrics export port 8852) runs the
app on port 8851: built-in model (fp32, enforce_eager), **2 engine replicas**, each with
max_loras 4 and max_cpu_loras 8, 16 tenants each owning one adapter (`builtin:` demo files,
round robin; 16 distinct engine adapters: more than the slots and the CPU cache of a replica).
Routers:

- `adapter_affinity`: ours (app/request_router.py), `routing.router: adapter_affinity`;
- `ray_default`: Ray Serve's PowerOfTwoChoicesRequestRouter (`routing.router: ray_default`); the
  request's adapter is its multiplexed model id, but no replica reports any, so this is plain
  power of two choices;
- `ray_multiplex`: the same Ray router, with the engine replicas reporting the adapters they
  hold as multiplexed model ids through `@serve.multiplexed` (benchmarks/routing/
  multiplexed_engine.py): Ray's multiplexing affinity.

Traffic, the same for every router (seed 12): Poisson arrivals at `--rate`/s for `--duration-s`,
each from a tenant drawn from Zipf(s = 1.1) over the 16, a streaming chat to the tenant's
adapter with a prompt of lognormal(24, 0.5, max 100) words and max_tokens uniform 16..48
(ignore_eos). Every request is sent at its scheduled time whatever happened before (open loop).

Counted per run:
- vLLM's adapter loads, from vLLM's own (debug) log lines in the engine processes: vLLM exports
  no counter for LoRA loads, so the engines run with VLLM_LOGGING_LEVEL=DEBUG and the script
  counts `Adding lora` (the worker's LRU over max_cpu_loras missed: the adapter is read from
  disk into host memory) and `Activating LoRA` (an adapter put into one of the max_loras
  slots), traffic only (counts before the first request are subtracted);
- our counters from Ray's metrics export port: `ray_moelora_adapter_loads_total{outcome}`
  (first registration of an adapter version with an engine's vLLM: at most once per adapter and
  replica, not a cache miss) and `ray_moelora_routing_decisions_total{tier}` (our router only);
- the client's view: TTFT (to the first content chunk) p50/p99, completion tokens/s over the
  window from the first request sent to the last one finished, errors, requests per replica
  (`x-served-by`) and distinct adapters per replica.

Each run's JSON goes to `--out-dir` (benchmarks/routing/results/) as it finishes; the table of
this invocation's runs is printed last (`--table FILES...` prints it for earlier results).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import re
import shutil
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

from app.builtin_model import BUILTIN_MODEL_NAME, DEMO_ADAPTERS
from app.config import AppConfig
from loadtest.report import percentile
from loadtest.workload import LengthDist, ZipfSampler, prompt_text

PORT = 8851
METRICS_PORT = 8852
URL = f"http://127.0.0.1:{PORT}/v1/chat/completions"
ROOT = Path(__file__).resolve().parents[2]
ROUTERS = ("adapter_affinity", "ray_default", "ray_multiplex")
SEED = 12
N_TENANTS = 16
ZIPF_S = 1.1
PROMPT_WORDS = "lognormal:24:0.5:100"
OUTPUT_TOKENS = "uniform:16:48"
MAX_LORAS = 4
MAX_CPU_LORAS = 8
REPLICAS = 2
# vLLM's debug lines (vllm/lora/model_manager.py): a miss of the worker's host-memory LRU (the
# adapter is read from disk) and an adapter put into an accelerator slot.
CPU_LOAD_LINE = "Adding lora. Model id"
SLOT_LOAD_LINE = "Activating LoRA. int id"


def tenant(i: int) -> str:
    return f"rt-t{i:02d}"


def key(name: str) -> str:
    return f"sk-{name}-routing"


@dataclass(frozen=True)
class Arrival:
    at_s: float
    tenant: str
    prompt: str
    max_tokens: int


def schedule(duration_s: float, rate: float) -> list[Arrival]:
    """The run's traffic: the same for every router (seeded)."""
    rng = random.Random(SEED)
    zipf = ZipfSampler(N_TENANTS, ZIPF_S, random.Random(SEED + 1))
    words, outputs = LengthDist.parse(PROMPT_WORDS), LengthDist.parse(OUTPUT_TOKENS)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        name = tenant(zipf() + 1)
        out.append(Arrival(t, name, prompt_text(rng, words.sample(rng)), outputs.sample(rng)))


def app_args(router: str, registry_path: str) -> dict:
    tenants = [
        {"name": tenant(i), "api_key_sha256": [hashlib.sha256(key(tenant(i)).encode()).hexdigest()]}
        for i in range(1, N_TENANTS + 1)
    ]
    adapters = [
        {"name": "chat", "owner": tenant(i),
         "path": f"builtin:{DEMO_ADAPTERS[(i - 1) % len(DEMO_ADAPTERS)].name}"}
        for i in range(1, N_TENANTS + 1)
    ]  # fmt: skip
    return {
        "engine": {
            "model": "builtin",
            "served_model_name": BUILTIN_MODEL_NAME,
            "dtype": "float32",
            "max_loras": MAX_LORAS,
            "max_cpu_loras": MAX_CPU_LORAS,
            "max_lora_rank": 16,
            "max_model_len": 1024,
            "max_num_seqs": 16,
            "gpu_memory_utilization": 0.3,
            "enforce_eager": True,
        },
        "deployment": {
            "num_replicas": REPLICAS,
            "max_ongoing_requests": 64,
            "max_queued_requests": 512,
            "ray_actor_options": {"num_cpus": 1},
            # nobind: vLLM would pin both replicas to core 0 of this 2-core box (auto binding
            # reserves the other core), where they starve each other.
            "env_vars": {"VLLM_LOGGING_LEVEL": "DEBUG", "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
        },
        "routing": {"router": "ray_default" if router == "ray_multiplex" else router},
        "registry": {"path": registry_path},
        "tenants": tenants,
        "adapters": adapters,
    }


@dataclass
class Record:
    tenant: str
    scheduled_s: float
    sent: float = 0.0
    outcome: str = "pending"
    ttft: float | None = None
    end: float | None = None
    completion_tokens: int = 0
    replica: str = ""


async def send(client: httpx.AsyncClient, a: Arrival, rec: Record) -> None:
    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": a.prompt}],
        "max_tokens": a.max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    rec.sent = time.monotonic()
    try:
        async with client.stream(
            "POST", URL, json=body, headers={"Authorization": f"Bearer {key(a.tenant)}"}
        ) as resp:
            rec.replica = resp.headers.get("x-served-by", "")
            if resp.status_code != 200:
                await resp.aread()
                rec.outcome = f"http_{resp.status_code}"
                return
            last = None
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                last = line
                if line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec.outcome = "error_event"
                    return
                for choice in chunk.get("choices") or []:
                    if rec.ttft is None and (choice.get("delta") or {}).get("content"):
                        rec.ttft = time.monotonic() - rec.sent
                if chunk.get("usage") and not chunk.get("choices"):
                    rec.completion_tokens = chunk["usage"].get("completion_tokens", 0)
            rec.outcome = "ok" if last == "data: [DONE]" else "bad_stream"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.outcome = type(exc).__name__
    finally:
        rec.end = time.monotonic()


async def run_traffic(arrivals: list[Arrival], drain_s: float) -> list[Record]:
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(300, connect=30),
        limits=httpx.Limits(max_connections=512, max_keepalive_connections=512),
    )
    records = [Record(a.tenant, a.at_s) for a in arrivals]
    tasks = []
    try:
        t0 = time.monotonic()
        for a, rec in zip(arrivals, records, strict=True):
            await asyncio.sleep(max(0.0, t0 + a.at_s - time.monotonic()))
            tasks.append(asyncio.create_task(send(client, a, rec)))
        _, late = await asyncio.wait(tasks, timeout=drain_s)
        for t in late:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for rec in records:
            if rec.outcome == "pending":
                rec.outcome = "cancelled"
    finally:
        await client.aclose()
    return records


async def warm_up() -> None:
    """Base-model requests (no adapter) until both replicas answered: every replica has run a
    forward pass before the measurement, and no adapter is loaded by it."""
    seen: set[str] = set()
    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(40):
            resp = await client.post(
                URL,
                headers={"Authorization": f"Bearer {key(tenant(1))}"},
                json={"model": BUILTIN_MODEL_NAME, "max_tokens": 4,
                      "messages": [{"role": "user", "content": "hello"}]},
            )  # fmt: skip
            resp.raise_for_status()
            seen.add(resp.headers.get("x-served-by", ""))
            if len(seen) >= REPLICAS:
                return


def count_log_lines(log_dir: Path) -> dict[str, int]:
    counts = {"cpu_cache_loads": 0, "slot_loads": 0}
    for path in log_dir.rglob("*"):
        if not path.is_file() or path.suffix not in (".out", ".err", ".log"):
            continue
        with path.open(errors="replace") as f:
            for line in f:
                if CPU_LOAD_LINE in line:
                    counts["cpu_cache_loads"] += 1
                elif SLOT_LOAD_LINE in line:
                    counts["slot_loads"] += 1
    return counts


METRIC_LINE = re.compile(r"^(ray_moelora_(?:adapter_loads|routing_decisions)_total)\{(.*)\} (\S+)$")


def scrape_counters() -> dict[str, dict[str, float]]:
    """Our counters from Ray's metrics export port, summed over replicas by their label."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10)
        text = text.read().decode()
    except OSError as exc:
        return {"error": {str(exc): 1}}
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        label = re.search(r'(?:outcome|tier)="([^"]*)"', labels)
        by = out.setdefault(name, {})
        k = label.group(1) if label else ""
        by[k] = by.get(k, 0) + float(value)
    return out


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def analyse(records: list[Record]) -> dict:
    ok = [r for r in records if r.outcome == "ok"]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    start = min(r.sent for r in records)
    end = max(r.end for r in records if r.end is not None)
    tokens = sum(r.completion_tokens for r in ok)
    per_replica: dict[str, dict] = {}
    for r in records:
        if r.replica:
            d = per_replica.setdefault(r.replica, {"requests": 0, "adapters": set()})
            d["requests"] += 1
            d["adapters"].add(r.tenant)
    return {
        "requests": len(records),
        "ok": len(ok),
        "outcomes": dict(Counter(r.outcome for r in records)),
        "ttft_p50_s": r3(percentile(ttfts, 50)),
        "ttft_p90_s": r3(percentile(ttfts, 90)),
        "ttft_p99_s": r3(percentile(ttfts, 99)),
        "ttft_max_s": r3(max(ttfts)) if ttfts else None,
        "completion_tokens": tokens,
        "window_s": round(end - start, 2),
        "tokens_per_s": round(tokens / (end - start), 2),
        "per_replica": {
            k: {"requests": v["requests"], "distinct_adapters": len(v["adapters"])}
            for k, v in per_replica.items()
        },
    }


def run_one(router: str, args, arrivals: list[Arrival]) -> dict:
    import ray
    from ray import serve

    import app.main
    from app.engine import EngineDeployment

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    cfg = app_args(router, str(tmp / "registry.sqlite"))
    if args.imbalance_threshold is not None:  # ours only; the app's default otherwise
        cfg["routing"]["imbalance_threshold"] = args.imbalance_threshold
    app.main.EngineDeployment = EngineDeployment
    if router == "ray_multiplex":
        from benchmarks.routing.multiplexed_engine import MultiplexReportingEngineDeployment

        app.main.EngineDeployment = MultiplexReportingEngineDeployment
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(tmp / "ray"),
        _metrics_export_port=METRICS_PORT,
    )
    log_dir = tmp / "ray" / "session_latest" / "logs"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(app.main.build_app(cfg), name="moelora", route_prefix="/")
        asyncio.run(warm_up())
        up_s = time.monotonic() - started
        print(f"[{router}] app up in {up_s:.0f} s; {len(arrivals)} requests", flush=True)
        before = count_log_lines(log_dir)
        records = asyncio.run(run_traffic(arrivals, args.drain_s))
        time.sleep(args.settle_s)  # log lines flushed, metrics exported
        after = count_log_lines(log_dir)
        counters = scrape_counters()
    finally:
        serve.shutdown()
        ray.shutdown()
        app.main.EngineDeployment = EngineDeployment
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "router": router,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, 1-min load average after the run "
        f"{os.getloadavg()[0]:.1f}",
        "versions": _versions(),
        "parameters": {
            "duration_s": args.duration_s,
            "rate_per_s": args.rate,
            # ours: the bound the app ran with (set, or derived from the batch); Ray's: None
            "imbalance_threshold": (
                AppConfig.from_args(cfg).imbalance_threshold
                if router == "adapter_affinity"
                else None
            ),
            "seed": SEED,
            "tenants": N_TENANTS,
            "zipf_s": ZIPF_S,
            "prompt_words": PROMPT_WORDS,
            "output_tokens": OUTPUT_TOKENS,
            "replicas": REPLICAS,
            "max_loras": MAX_LORAS,
            "max_cpu_loras": MAX_CPU_LORAS,
            "drain_s": args.drain_s,
            "app_args": {k: v for k, v in cfg.items() if k not in ("tenants", "registry")},
        },
        "vllm_loads": {k: after[k] - before[k] for k in after},
        "vllm_loads_during_startup": before,
        "our_counters": counters,
        "client": analyse(records),
        "requests_per_tenant": dict(sorted(Counter(a.tenant for a in arrivals).items())),
        "total_run_s": round(time.monotonic() - started, 1),
    }


def table(results: list[dict]) -> str:
    head = ("router", "requests", "ok", "vLLM disk loads", "vLLM slot loads", "our loads",
            "p50 TTFT", "p99 TTFT", "tokens/s", "adapters/replica")  # fmt: skip
    lines = ["{:<17}{:>9}{:>5}{:>16}{:>16}{:>10}{:>10}{:>10}{:>10}{:>18}".format(*head)]
    for r in results:
        c = r["client"]
        ours = r["our_counters"].get("ray_moelora_adapter_loads_total", {}).get("loaded")
        spread = "/".join(str(v["distinct_adapters"]) for v in c["per_replica"].values())
        lines.append(
            f"{r['router']:<17}{c['requests']:>9}{c['ok']:>5}"
            f"{r['vllm_loads']['cpu_cache_loads']:>16}{r['vllm_loads']['slot_loads']:>16}"
            f"{'-' if ours is None else int(ours):>10}{_f(c['ttft_p50_s']):>10}"
            f"{_f(c['ttft_p99_s']):>10}{c['tokens_per_s']:>10.1f}{spread:>18}"
        )
    base = next((r for r in results if r["router"] == "ray_default"), None)
    if base is not None:
        lines.append("")
        for r in results:
            if r is base:
                continue
            ratios = []
            for k in ("cpu_cache_loads", "slot_loads"):
                b = base["vllm_loads"][k]
                ratios.append(f"{k} {r['vllm_loads'][k] / b:.2f}x" if b else f"{k} -")
            b99, p99 = base["client"]["ttft_p99_s"], r["client"]["ttft_p99_s"]
            if b99 and p99 is not None:
                ratios.append(f"p99 TTFT {p99 / b99:.2f}x")
            bt = base["client"]["tokens_per_s"]
            if bt:
                ratios.append(f"tokens/s {r['client']['tokens_per_s'] / bt:.2f}x")
            lines.append(f"{r['router']} / ray_default: " + ", ".join(ratios))
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _versions() -> dict[str, str]:
    import ray
    import torch
    import vllm

    return {"ray": ray.__version__, "vllm": vllm.__version__, "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routers", default=",".join(ROUTERS))
    parser.add_argument("--duration-s", type=float, default=90.0)
    parser.add_argument("--rate", type=float, default=2.0, help="requests/s (Poisson)")
    parser.add_argument("--drain-s", type=float, default=90.0, help="wait for the last requests")
    parser.add_argument("--settle-s", type=float, default=12.0, help="before reading counters")
    parser.add_argument(
        "--imbalance-threshold", type=int, default=None, help="our router's load bound"
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks/routing/results")
    parser.add_argument("--table", type=Path, nargs="*", help="print the table of these results")
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(p.read_text()) for p in args.table]))
        return
    routers = args.routers.split(",")
    unknown = set(routers) - set(ROUTERS)
    if unknown:
        parser.error(f"unknown routers: {sorted(unknown)}; choose from {ROUTERS}")
    arrivals = schedule(args.duration_s, args.rate)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for router in routers:
        result = run_one(router, args, arrivals)
        out = args.out_dir / f"{router}_{time.strftime('%Y%m%d_%H%M')}.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"[{router}] written to {out} (run took {result['total_run_s']:.0f} s)", flush=True)
        results.append(result)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
