"""Fair sharing under contention (issue 10, item 5), measured with the real app on CPU.

    .venv/bin/python -m benchmarks.tenancy.flood --fair on|off [--scale 1] [--out FILE]

Starts the app in a local Ray (built-in model, fp32, 1 engine replica, enforce_eager,
max_num_seqs 16, the 4 demo tenants of tenants.demo.yaml with weights acme 1, globex 1,
initech 2, umbrella 4, a fresh registry in a temp dir, `engine.fair_sharing` per `--fair`;
the engine deployment takes up to 256 requests, so they wait in the engine's fair queue, not in
Ray's router) and runs three phases against it over HTTP (httpx streaming, asyncio, fixed seeds):

1. unloaded: globex, initech and umbrella each send short streaming chats (max_tokens 8, own
   adapter) one at a time: p50/p99 time to first token (TTFT, to the first content chunk) per
   tenant; the baseline.
2. flood: acme keeps 16 streaming requests in flight (max_tokens 256, n=2, ignore_eos, own
   adapter) while the three light tenants send phase 1's requests at ~1/s each (Poisson). Per
   tenant: requests, completion tokens, p50/p99 TTFT, 429s, errors; each light tenant's p99 TTFT
   under the flood over its unloaded p99 (target <= 2x).
3. backlogged shares: every tenant keeps 24 long requests in flight (max_tokens 128, ignore_eos,
   own adapter; 12 were too few to keep the weight-4 tenant backlogged at 8 of 16 seats);
   after a warm-up, the completion tokens each tenant is served in the measured window (from
   vLLM's per-chunk usage, `stream_options.continuous_usage_stats`, timed at arrival) as a
   share of all, against its weight's share (target: within +-10% of it).

Durations (20 s, 60 s, 60 s and warm-ups) are multiplied by `--scale` (0.2 for a quick check).
The tables are printed last; everything measured, with the parameters, goes to a JSON file
(default benchmarks/tenancy/results/flood_<fair|fcfs>_<date>.json; quoted in docs/tenancy.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
import yaml

from app.builtin_model import BUILTIN_MODEL_NAME, DEMO_TENANTS
from loadtest.report import percentile

PORT = 8791
URL = f"http://127.0.0.1:{PORT}/v1/chat/completions"
ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = {"acme": 1.0, "globex": 1.0, "initech": 2.0, "umbrella": 4.0}
FLOODER = "acme"
LIGHT = ("globex", "initech", "umbrella")
KEYS = {t.name: t.api_key for t in DEMO_TENANTS}
ADAPTER = {t.name: t.adapter for t in DEMO_TENANTS}
WORDS = (
    "order invoice refund parcel contract clause build test dose report delivery account "
    "payment schedule release patient warranty ticket"
).split()
SEED = 10


@dataclass
class Record:
    """One request as the client saw it."""

    tenant: str
    phase: str
    start: float
    outcome: str = "pending"  # ok, http_<status>, error_event, bad_stream, cancelled, <exception>
    ttft: float | None = None  # seconds from sending to the first non-empty content chunk
    end: float | None = None
    completion_tokens: int = 0  # vLLM's final usage (all choices), when the stream completed
    # (arrival time, completion tokens newly reported) from vLLM's per-chunk usage
    token_times: list[tuple[float, int]] = field(default_factory=list, repr=False)

    def tokens_between(self, t0: float, t1: float) -> int:
        return sum(n for t, n in self.token_times if t0 <= t < t1)


class Load:
    """The client: streaming chat requests over one connection pool, every one recorded."""

    def __init__(self) -> None:
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(600, connect=30),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=512),
        )
        self.records: list[Record] = []

    async def send(self, tenant: str, phase: str, body: dict) -> Record:
        body = {
            **body,
            "model": ADAPTER[tenant],
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        rec = Record(tenant, phase, time.monotonic())
        self.records.append(rec)
        seen: dict[int, int] = {}  # choice index -> completion tokens reported so far
        try:
            async with self.client.stream(
                "POST", URL, json=body, headers={"Authorization": f"Bearer {KEYS[tenant]}"}
            ) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    rec.outcome = f"http_{resp.status_code}"
                    return rec
                last = None
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    last = line
                    if line == "data: [DONE]":
                        continue
                    now = time.monotonic()
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        rec.outcome = "error_event"
                        return rec
                    usage = chunk.get("usage") or {}
                    choices = chunk.get("choices") or []
                    if not choices:  # the final usage chunk: every choice together
                        rec.completion_tokens = usage.get("completion_tokens", 0)
                        continue
                    for choice in choices:
                        if rec.ttft is None and (choice.get("delta") or {}).get("content"):
                            rec.ttft = now - rec.start
                    if usage and len(choices) == 1:
                        i = choices[0].get("index", 0)
                        new = usage.get("completion_tokens", 0) - seen.get(i, 0)
                        if new > 0:
                            seen[i] = seen.get(i, 0) + new
                            rec.token_times.append((now, new))
                rec.outcome = "ok" if last == "data: [DONE]" else "bad_stream"
        except asyncio.CancelledError:
            rec.outcome = "cancelled"
            raise
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            rec.outcome = type(exc).__name__
        finally:
            rec.end = time.monotonic()
        return rec

    async def closed_loop(self, tenant: str, phase: str, make_body, stop: asyncio.Event) -> None:
        """One request after another until `stop` is set (the one in flight then completes)."""
        while not stop.is_set():
            await self.send(tenant, phase, make_body())

    async def poisson(
        self, tenant: str, phase: str, make_body, rate: float, until: float, rng: random.Random
    ) -> list[asyncio.Task]:
        """Requests at Poisson arrivals of `rate`/s until `until`; each its own task."""
        tasks = []
        while (now := time.monotonic()) < until:
            tasks.append(asyncio.create_task(self.send(tenant, phase, make_body())))
            await asyncio.sleep(min(rng.expovariate(rate), max(0.0, until - now)))
        return tasks


def prompt(rng: random.Random, words: int, lead: str) -> list[dict]:
    text = lead + " " + " ".join(rng.choice(WORDS) for _ in range(words))
    return [{"role": "user", "content": text}]


def light_body(rng: random.Random) -> dict:
    return {"messages": prompt(rng, rng.randint(3, 12), "Where is my"), "max_tokens": 8,
            "ignore_eos": True}  # fmt: skip


async def cancel_all(tasks: list[asyncio.Task]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def settle(seconds: float) -> None:
    """Time for cancelled requests to leave the engine before the next phase."""
    await asyncio.sleep(seconds)


async def run_phases(args, load: Load) -> dict:
    s = args.scale
    rng = {t: random.Random(f"{SEED}-{t}") for t in WEIGHTS}
    windows: dict[str, tuple[float, float]] = {}

    # Warm-up: every adapter loaded once, outside any measurement.
    await asyncio.gather(*(load.send(t, "warmup", light_body(rng[t])) for t in WEIGHTS))

    # 1. unloaded
    print(f"phase 1: unloaded, {20 * s:.0f} s", flush=True)
    stop = asyncio.Event()
    t0 = time.monotonic()
    workers = [
        asyncio.create_task(load.closed_loop(t, "unloaded", lambda t=t: light_body(rng[t]), stop))
        for t in LIGHT
    ]
    await asyncio.sleep(20 * s)
    stop.set()
    await asyncio.gather(*workers)
    windows["unloaded"] = (t0, time.monotonic())

    # 2. flood
    def flood_body() -> dict:
        return {"messages": prompt(rng[FLOODER], 40, "Summarise"), "max_tokens": args.flood_tokens,
                "n": args.flood_n, "ignore_eos": True}  # fmt: skip

    warm = max(3.0, 5 * s)
    print(f"phase 2: flood, {warm:.0f} s warm-up + {60 * s:.0f} s", flush=True)
    stop = asyncio.Event()
    flood = [
        asyncio.create_task(load.closed_loop(FLOODER, "flood", flood_body, stop))
        for _ in range(args.flood_concurrency)
    ]
    await asyncio.sleep(warm)
    t0 = time.monotonic()
    light = await asyncio.gather(
        *(
            load.poisson(t, "flood", lambda t=t: light_body(rng[t]), 1.0, t0 + 60 * s, rng[t])
            for t in LIGHT
        )
    )
    light_tasks = [task for tasks in light for task in tasks]
    t1 = time.monotonic()
    _, late = await asyncio.wait(light_tasks, timeout=args.drain_s) if light_tasks else ((), ())
    await cancel_all(list(late))  # still waiting after the drain: recorded as cancelled
    windows["flood"] = (t0, t1)
    await cancel_all(flood)
    await settle(3)

    # 3. backlogged shares
    def long_body(t: str) -> dict:
        return {"messages": prompt(rng[t], 20, "Explain"), "max_tokens": args.share_tokens,
                "ignore_eos": True}  # fmt: skip

    warm = max(3.0, 10 * s)
    print(f"phase 3: backlogged shares, {warm:.0f} s warm-up + {60 * s:.0f} s", flush=True)
    stop = asyncio.Event()
    backlog = [  # interleaved, so that no tenant's requests all arrive first
        asyncio.create_task(load.closed_loop(t, "shares", lambda t=t: long_body(t), stop))
        for _ in range(args.share_concurrency)
        for t in WEIGHTS
    ]
    await asyncio.sleep(warm)
    t0 = time.monotonic()
    await asyncio.sleep(60 * s)
    windows["shares"] = (t0, time.monotonic())
    await cancel_all(backlog)
    await settle(2)
    return windows


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def tenant_stats(records: list[Record], window: tuple[float, float]) -> dict:
    """Requests started in the window, and tokens that arrived in it. TTFT of the requests
    started in the window, and of those started before it (the flooder's, during the warm-up)
    whose first token came in it; a request cancelled at the end of the phase before its first
    token has none (counted as `cancelled`)."""
    t0, t1 = window
    started = [r for r in records if t0 <= r.start < t1]
    ttfts = [
        r.ttft
        for r in records
        if r.ttft is not None and (t0 <= r.start < t1 or t0 <= r.start + r.ttft < t1)
    ]
    outcomes = Counter(r.outcome for r in started)
    return {
        "requests": len(started),
        "ok": outcomes["ok"],
        "completed_in_window": sum(
            1 for r in records if r.outcome == "ok" and r.end is not None and t0 <= r.end < t1
        ),
        "http_429": outcomes["http_429"],
        "cancelled": outcomes["cancelled"],
        "errors": sum(n for k, n in outcomes.items() if k not in ("ok", "http_429", "cancelled")),
        "outcomes": dict(outcomes),
        "completion_tokens": sum(r.tokens_between(t0, t1) for r in records),
        "ttft_p50_s": r3(percentile(ttfts, 50)),
        "ttft_p99_s": r3(percentile(ttfts, 99)),
        "ttft_max_s": r3(max(ttfts)) if ttfts else None,
        "ttfts_s": [r3(x) for x in ttfts],
    }


def analyse(records: list[Record], windows: dict[str, tuple[float, float]]) -> dict:
    out: dict[str, dict] = {}
    for phase, window in windows.items():
        per_tenant = {}
        for tenant in WEIGHTS:
            recs = [r for r in records if r.phase == phase and r.tenant == tenant]
            if recs:
                per_tenant[tenant] = tenant_stats(recs, window)
        out[phase] = {"window_s": round(window[1] - window[0], 2), "tenants": per_tenant}
    for tenant in LIGHT:
        base = out["unloaded"]["tenants"][tenant]["ttft_p99_s"]
        flood = out["flood"]["tenants"][tenant]
        ratio = flood["ttft_p99_s"] / base if base and flood["ttft_p99_s"] is not None else None
        flood["p99_over_unloaded_p99"] = r3(ratio)
    shares = out["shares"]["tenants"]
    total = sum(s["completion_tokens"] for s in shares.values())
    total_weight = sum(WEIGHTS.values())
    for tenant, s in shares.items():
        target = WEIGHTS[tenant] / total_weight
        s["weight"] = WEIGHTS[tenant]
        s["share"] = round(s["completion_tokens"] / total, 4) if total else None
        s["weight_share"] = round(target, 4)
        s["share_over_weight_share"] = round(s["share"] / target, 3) if total else None
    out["shares"]["completion_tokens_per_s"] = round(total / out["shares"]["window_s"], 1)
    return out


def tables(result: dict) -> str:
    res = result["phases"]
    lines = [f"fair_sharing={result['parameters']['fair_sharing']}  ({result['date']})", ""]

    def fmt(x) -> str:
        return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    lines.append(f"1. unloaded ({res['unloaded']['window_s']:.0f} s, one request at a time)")
    lines.append(f"{'tenant':<10}{'requests':>9}{'errors':>7}{'p50 TTFT':>10}{'p99 TTFT':>10}")
    for t, s in res["unloaded"]["tenants"].items():
        lines.append(
            f"{t:<10}{s['requests']:>9}{s['errors']:>7}"
            f"{fmt(s['ttft_p50_s']):>10}{fmt(s['ttft_p99_s']):>10}"
        )
    lines.append("")
    lines.append(
        f"2. flood ({res['flood']['window_s']:.0f} s; requests: started in it, done: completed in"
        " it, tokens: arrived in it, cut: cancelled at its end)"
    )
    head = ("tenant", "requests", "done", "tokens", "p50 TTFT", "p99 TTFT", "429s", "errors",
            "cut", "p99/unloaded")  # fmt: skip
    lines.append("{:<10}{:>9}{:>6}{:>8}{:>10}{:>10}{:>6}{:>7}{:>5}{:>14}".format(*head))
    for t, s in res["flood"]["tenants"].items():
        ratio = s.get("p99_over_unloaded_p99")
        lines.append(
            f"{t:<10}{s['requests']:>9}{s['completed_in_window']:>6}{s['completion_tokens']:>8}"
            f"{fmt(s['ttft_p50_s']):>10}"
            f"{fmt(s['ttft_p99_s']):>10}{s['http_429']:>6}{s['errors']:>7}{s['cancelled']:>5}"
            f"{(fmt(ratio) + 'x') if ratio is not None else '-':>14}"
        )
    lines.append("")
    sh = res["shares"]
    lines.append(
        f"3. backlogged shares ({sh['window_s']:.0f} s, {sh['completion_tokens_per_s']} tokens/s)"
    )
    head = ("tenant", "weight", "requests", "tokens", "share", "weight share", "share/weight",
            "errors")  # fmt: skip
    lines.append("{:<10}{:>7}{:>9}{:>8}{:>8}{:>14}{:>14}{:>7}".format(*head))
    for t, s in sh["tenants"].items():
        lines.append(
            f"{t:<10}{s['weight']:>7.0f}{s['requests']:>9}{s['completion_tokens']:>8}"
            f"{fmt(s['share']):>8}{fmt(s['weight_share']):>14}"
            f"{fmt(s['share_over_weight_share']):>14}{s['errors']:>7}"
        )
    return "\n".join(lines)


def app_args(fair: bool, registry_path: str) -> dict:
    demo = yaml.safe_load((ROOT / "tenants.demo.yaml").read_text())
    tenants = [{**t, "weight": WEIGHTS[t["name"]]} for t in demo["tenants"]]
    return {
        "engine": {
            "model": "builtin",
            "served_model_name": BUILTIN_MODEL_NAME,
            "dtype": "float32",
            "max_loras": 4,
            "max_cpu_loras": 8,
            "max_lora_rank": 16,
            "max_model_len": 1024,
            "max_num_seqs": 16,
            "gpu_memory_utilization": 0.3,
            "enforce_eager": True,
            "fair_sharing": fair,
        },
        "deployment": {
            "num_replicas": 1,
            "max_ongoing_requests": 256,
            "max_queued_requests": 512,
            "ray_actor_options": {"num_cpus": 1},
        },
        "registry": {"path": registry_path},
        "tenants": tenants,
        "adapters": demo["adapters"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fair", choices=("on", "off"), required=True)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every duration")
    parser.add_argument("--flood-concurrency", type=int, default=16)
    parser.add_argument("--flood-tokens", type=int, default=256)
    parser.add_argument("--flood-n", type=int, default=2)
    parser.add_argument("--share-concurrency", type=int, default=24, help="per tenant")
    parser.add_argument("--share-tokens", type=int, default=128)
    parser.add_argument("--drain-s", type=float, default=30.0, help="wait for late light requests")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    fair = args.fair == "on"

    import ray
    from ray import serve

    from app.main import build_app

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flood-registry-") as tmp:
        cfg = app_args(fair, str(Path(tmp) / "registry.sqlite"))
        # "local": a Ray of its own, never a cluster found on this machine (`ray start`).
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": PORT})
            serve.run(build_app(cfg), name="moelora", route_prefix="/")
            print(f"app up in {time.monotonic() - started:.0f} s (fair_sharing={fair})", flush=True)

            async def go() -> tuple[dict, list[Record]]:
                load = Load()
                try:
                    return await run_phases(args, load), load.records
                finally:
                    await load.client.aclose()

            windows, records = asyncio.run(go())
        finally:
            serve.shutdown()
            ray.shutdown()

    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "versions": _versions(),
        "parameters": {
            "fair_sharing": fair,
            **{k: v for k, v in vars(args).items() if k not in ("fair", "out")},
            "weights": WEIGHTS,
            "seed": SEED,
            "light": {"max_tokens": 8, "unloaded": "one at a time", "under_flood_rate_per_s": 1.0},
            "app_args": {k: v for k, v in cfg.items() if k not in ("tenants", "registry")},
        },
        "total_run_s": round(time.monotonic() - started, 1),
        "phases": analyse(records, windows),
    }
    out = args.out or ROOT / "benchmarks/tenancy/results" / (
        f"flood_{'fair' if fair else 'fcfs'}_{time.strftime('%Y%m%d')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten to {out} (run took {result['total_run_s']:.0f} s)\n")
    print(tables(result))


def _versions() -> dict[str, str]:
    import ray
    import torch
    import vllm

    return {"ray": ray.__version__, "vllm": vllm.__version__, "torch": torch.__version__}


if __name__ == "__main__":
    main()
