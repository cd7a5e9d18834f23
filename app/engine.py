"""The engine deployment: one vLLM AsyncLLM per replica, behind vLLM's own OpenAI serving layer.

Requests arrive already authenticated and resolved by the ingress: a vLLM protocol request whose
`model` is the base model or an adapter name, the adapter also being the handle's multiplexed
model id (app/contract.py). Chat templating, sampling-parameter validation, streaming chunk
format and usage accounting are vLLM's (OpenAIServingChat/Completion), so clients see exactly
what `vllm serve` sends. This module adds what a multi-tenant fleet needs: adapters loaded on
demand from the replica's catalogue, replies in the typed contract, and the replica's state
published for request routing (resident adapters) and autoscaling (queue and KV-cache use).

`VLLMEngine` holds the engine and knows nothing of Ray; `EngineDeployment` is the thin Ray Serve
replica around it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from app.config import EngineConfig
from app.contract import (
    Accepted,
    AutoscalingStat,
    EngineUnavailable,
    ReplyHead,
    ReplyItem,
    ReplyKind,
    ReplyTail,
    RoutingStats,
)
from app.logs import get_logger
from app.model_files import resolve_adapter_path, resolve_model_path
from app.replica_env import reset_niceness

logger = get_logger("engine")

ENGINE_WATCH_PERIOD_S = 0.1
ENGINE_EXIT_DELAY_S = 0.3


@dataclass
class SchedulerLoad:
    """Latest scheduler state, filled by the stat logger on every engine step."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    # Adapters most recently scheduled, oldest first: vLLM evicts accelerator slots LRU, so the
    # last `max_loras` distinct adapters that ran are the ones resident in the slots.
    recent_adapters: OrderedDict[str, None] = field(default_factory=OrderedDict)


def make_stat_logger_factory(load: SchedulerLoad, max_loras: int):
    """A vLLM stat logger class that copies each step's scheduler stats into `load`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerLoadRecorder(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is None:
                return
            load.running = scheduler_stats.num_running_reqs
            load.waiting = (
                scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            )
            load.kv_cache_usage = scheduler_stats.kv_cache_usage
            for name in scheduler_stats.running_lora_adapters:
                load.recent_adapters.pop(name, None)
                load.recent_adapters[name] = None
            while len(load.recent_adapters) > max_loras:
                load.recent_adapters.popitem(last=False)

        def log_engine_initialized(self):
            pass

    return SchedulerLoadRecorder


def vllm_cli_args(cfg: EngineConfig) -> list[str]:
    """Our engine config as `vllm serve` flags, so vLLM's own parser fills every default."""
    args = {
        "model": resolve_model_path(cfg.model),
        "served_model_name": cfg.served_model_name,
        "dtype": cfg.dtype,
        "enable_lora": True,
        "max_loras": cfg.max_loras,
        "max_cpu_loras": cfg.max_cpu_loras,
        "max_lora_rank": cfg.max_lora_rank,
        "max_model_len": cfg.max_model_len,
        "max_num_seqs": cfg.max_num_seqs,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "enforce_eager": cfg.enforce_eager,
        "seed": cfg.seed,
        **cfg.extra_args,
    }
    flags = []
    for key, value in args.items():
        name = key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):  # vLLM's boolean flags all accept the --no- form
            flags.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, (dict, list)):
            flags += [f"--{name}", json.dumps(value)]
        else:
            flags += [f"--{name}", str(value)]
    return flags


async def coalesce(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """vLLM's SSE chunks, joined into one item whenever several are ready by the time the
    consumer asks for the next one; never waits for more (no timer: a lone stream still gets
    each token at once). Every item crossing the Ray hop costs the same however long it is, so
    a busy replica, whose consumer lags, sends few large items instead of many small ones."""
    ready: list[str] = []
    done = False
    failure: BaseException | None = None
    wake = asyncio.Event()

    async def pump() -> None:
        nonlocal done, failure
        try:
            async for chunk in chunks:
                ready.append(chunk)
                wake.set()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer below
            failure = exc
        finally:
            done = True
            wake.set()

    pumping = asyncio.create_task(pump())
    try:
        while True:
            await wake.wait()
            wake.clear()
            if ready:
                batch = "".join(ready)
                ready.clear()
                yield batch
            if done and not ready:
                if failure is not None:
                    raise failure
                return
    finally:
        pumping.cancel()


def _serving_request():
    """The `raw_request` vLLM's serving methods take: a server-made Starlette request with no
    client headers (a client never reaches vLLM's header-driven knobs such as priority or
    data-parallel rank), whose `state` receives vLLM's final usage of the request."""
    from starlette.requests import Request

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []})


class VLLMEngine:
    """The vLLM engine, its OpenAI serving objects and this replica's adapter catalogue."""

    def __init__(self, cfg: EngineConfig, adapter_paths: dict[str, str], replica_id: str = ""):
        self.cfg = cfg
        self.adapter_paths = adapter_paths
        self.replica_id = replica_id
        self.load = SchedulerLoad()
        self.engine = None
        self.serving_chat = None
        self.serving_completion = None
        self.models = None
        self._adapter_locks: dict[str, asyncio.Lock] = {}

    async def start(self) -> None:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_cli_args(self.cfg))
        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)
        stat_loggers = [make_stat_logger_factory(self.load, self.cfg.max_loras)]
        try:  # Ray-exported vLLM metrics (ray_vllm_*), when running inside Ray.
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            stat_loggers.append(RayPrometheusStatLogger)
        except ImportError:
            pass
        self.engine = AsyncLLM.from_vllm_config(
            vllm_config, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=stat_loggers
        )
        state = State()
        await init_app_state(
            self.engine, state, args, supported_tasks=await self.engine.get_supported_tasks()
        )
        self.serving_chat = state.openai_serving_chat
        self.serving_completion = state.openai_serving_completion
        self.models = state.openai_serving_models

    async def ensure_adapter(self, name: str | None):
        """Register the adapter with vLLM on first use; vLLM then loads and caches it (LRU over
        max_cpu_loras in memory, max_loras slots per batch). Returns an ErrorResponse or None."""
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        if name is None or name in self.models.lora_requests:
            return None
        path = self.adapter_paths.get(name)
        if path is None:  # the ingress resolved it, so the catalogues disagree: a deploy bug
            raise KeyError(f"adapter {name!r} is not in this replica's catalogue")
        async with self._adapter_locks.setdefault(name, asyncio.Lock()):
            if name in self.models.lora_requests:  # a concurrent request loaded it meanwhile
                return None
            t0 = time.monotonic()
            result = await self.models.load_lora_adapter(
                LoadLoRAAdapterRequest(lora_name=name, lora_path=resolve_adapter_path(path))
            )
            logger.info("adapter %s registered in %.3fs", name, time.monotonic() - t0)
        return result if not isinstance(result, str) else None

    async def cpu_resident_adapters(self) -> list[str]:
        ids = await self.engine.list_loras()
        return [n for n, r in self.models.lora_requests.items() if r.lora_int_id in ids]

    def chat(self, request, adapter: str | None) -> AsyncIterator[ReplyItem]:
        serving = self.serving_chat
        return self._reply(serving, serving.create_chat_completion, request, adapter)

    def completion(self, request, adapter: str | None) -> AsyncIterator[ReplyItem]:
        serving = self.serving_completion
        return self._reply(serving, serving.create_completion, request, adapter)

    async def _reply(
        self, serving, create: Callable[..., Awaitable[Any]], request, adapter: str | None
    ) -> AsyncIterator[ReplyItem]:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        if not self.serving:
            # Before Accepted: the ingress retries elsewhere instead of answering an error.
            raise EngineUnavailable(self.replica_id)
        yield Accepted(self.replica_id)
        error = await self.ensure_adapter(adapter)
        if error is not None:
            yield self._error_head(error)
            return
        raw_request = _serving_request()
        try:
            result = await create(request, raw_request)
        except Exception as exc:  # noqa: BLE001 - vLLM maps its validation errors to 400s
            # The same mapping vLLM's own API server applies to exceptions from these calls.
            result = serving.create_error_response(exc)
        if isinstance(result, ErrorResponse):
            yield self._error_head(result)
        elif hasattr(result, "__aiter__"):
            yield ReplyHead(ReplyKind.STREAM)
            async for chunk in coalesce(result):
                yield chunk
            usage = getattr(raw_request.state, "request_metadata", None)
            usage = usage.final_usage_info if usage is not None else None
            yield ReplyTail(
                usage.prompt_tokens if usage else None, usage.completion_tokens if usage else None
            )
        else:
            usage = result.usage
            yield ReplyHead(
                ReplyKind.JSON,
                body=result.model_dump_json().encode(),
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
            )

    @property
    def serving(self) -> bool:
        """False once vLLM's engine has failed (e.g. EngineCore died); it never recovers, and
        Ray replaces the replica after its health checks fail (`check_health`)."""
        return self.engine is not None and not self.engine.errored

    def _error_head(self, error) -> ReplyHead:
        return ReplyHead(ReplyKind.ERROR, error.error.code, error.model_dump_json().encode())

    async def routing_stats(self) -> RoutingStats:
        if not self.serving:
            return RoutingStats(serving=False)
        load = self.load
        return RoutingStats(
            accelerator_adapters=list(load.recent_adapters),
            cpu_adapters=await self.cpu_resident_adapters(),
            running=load.running,
            waiting=load.waiting,
            kv_cache_usage=load.kv_cache_usage,
            serving=self.serving,
        )


@serve.deployment(name="Engine")
class EngineDeployment:
    """Ray Serve replica around one VLLMEngine: one method per endpoint (app/contract.py)."""

    async def __init__(self, engine: EngineConfig, adapter_paths: dict[str, str]):
        reset_niceness()  # before vLLM starts its processes: they inherit it
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.llm = VLLMEngine(engine, adapter_paths, replica_id)
        # Start the engine in the constructor: the replica counts as running (and gets traffic)
        # only once vLLM is ready to serve.
        t0 = time.monotonic()
        await self.llm.start()
        logger.info("vLLM engine started in %.1fs", time.monotonic() - t0)
        self._watch = asyncio.get_running_loop().create_task(self._exit_when_engine_dies())

    async def _exit_when_engine_dies(self) -> None:
        """vLLM's engine never recovers once its EngineCore has died, and while this replica
        lives on it refuses everything at once, which makes it look like the least loaded
        replica. Exiting hands it to Ray's own handling of a dead actor: every router drops it
        on its next call and the controller starts a replacement now, instead of after three
        failed health checks and a graceful stop."""
        while self.llm.serving:
            await asyncio.sleep(ENGINE_WATCH_PERIOD_S)
        logger.error("the vLLM engine has failed; exiting so that Ray replaces this replica")
        await asyncio.sleep(ENGINE_EXIT_DELAY_S)  # in-flight streams send their error events
        os._exit(1)

    # Async generator methods, so Ray Serve streams them on its event loop (a plain method
    # returning a generator would count as a sync method).
    async def chat(self, request) -> AsyncIterator[ReplyItem]:
        async for item in self.llm.chat(request, serve.get_multiplexed_model_id() or None):
            yield item

    async def completion(self, request) -> AsyncIterator[ReplyItem]:
        async for item in self.llm.completion(request, serve.get_multiplexed_model_id() or None):
            yield item

    async def record_routing_stats(self) -> dict[str, Any]:
        return (await self.llm.routing_stats()).as_dict()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        load = self.llm.load
        return {
            AutoscalingStat.RUNNING_REQUESTS.value: float(load.running),
            AutoscalingStat.WAITING_REQUESTS.value: float(load.waiting),
            AutoscalingStat.KV_CACHE_USAGE.value: float(load.kv_cache_usage),
        }

    async def check_health(self) -> None:
        await self.llm.engine.check_health()


def engine_env_vars(extra: dict[str, str]) -> dict[str, str]:
    """Environment of an engine replica. On CPU, vLLM sizes its KV cache from this (GiB)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.update(extra)
    return env
