"""Engine deployment: one vLLM AsyncLLM per replica, behind vLLM's own OpenAI serving layer.

Requests arrive already authenticated and resolved by the router: a vLLM protocol request whose
`model` is the base model or an adapter name. Chat templating, sampling-parameter validation,
streaming chunk format and usage accounting are vLLM's (OpenAIServingChat/Completion), so clients
see exactly what `vllm serve` sends. This deployment adds what a multi-tenant fleet needs:
adapters loaded on demand from the catalog, and the replica's state published for routing
(which adapters are resident) and autoscaling (queue and KV-cache use).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from app.config import AppConfig, EngineConfig, resolve_model_path

logger = logging.getLogger(__name__)

# Keys of the routing stats a replica publishes (read by app.routing.AdapterAffinityRouter).
STAT_ACCELERATOR_ADAPTERS = "accelerator_adapters"
STAT_CPU_ADAPTERS = "cpu_adapters"
STAT_RUNNING = "running"
STAT_WAITING = "waiting"
STAT_KV_CACHE_USAGE = "kv_cache_usage"


@dataclass
class EngineLoad:
    """Latest scheduler state, filled by the stat logger on every engine step."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    running_adapters: tuple[str, ...] = ()
    # Adapters most recently scheduled, oldest first: vLLM evicts accelerator slots LRU, so the
    # last `max_loras` distinct adapters that ran are the ones resident in the slots.
    recent_adapters: OrderedDict = field(default_factory=OrderedDict)


def make_stat_logger_factory(load: EngineLoad, max_loras: int):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LoadRecorder(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is None:
                return
            load.running = scheduler_stats.num_running_reqs
            load.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            load.kv_cache_usage = scheduler_stats.kv_cache_usage
            running = tuple(scheduler_stats.running_lora_adapters)
            load.running_adapters = running
            for name in running:
                load.recent_adapters.pop(name, None)
                load.recent_adapters[name] = None
            while len(load.recent_adapters) > max_loras:
                load.recent_adapters.popitem(last=False)

        def log_engine_initialized(self):
            pass

    return LoadRecorder


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


class LLMEngine:
    """The vLLM engine and its OpenAI serving objects (no Ray here: testable on its own)."""

    def __init__(self, cfg: EngineConfig, adapter_paths: dict[str, str]):
        self.cfg = cfg
        self.adapter_paths = adapter_paths
        self.load = EngineLoad()
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
        if path is None:  # the router resolved it, so the catalogs disagree: a deploy bug
            raise KeyError(f"adapter {name!r} is not in this replica's catalog")
        async with self._adapter_locks.setdefault(name, asyncio.Lock()):
            if name in self.models.lora_requests:  # a concurrent request loaded it meanwhile
                return None
            result = await self.models.load_lora_adapter(
                LoadLoRAAdapterRequest(lora_name=name, lora_path=path)
            )
        return result if not isinstance(result, str) else None

    async def cpu_resident_adapters(self) -> list[str]:
        ids = await self.engine.list_loras()
        return [n for n, r in self.models.lora_requests.items() if r.lora_int_id in ids]


@serve.deployment(name="LLMEngine")
class EngineDeployment:
    """Ray Serve replica wrapping one LLMEngine. Streams vLLM's responses back to the router as
    (kind, payload) items: ("error", dict), ("json", dict) or ("sse", str) chunks."""

    async def __init__(self, config: dict[str, Any]):
        from app.adapters import AdapterRegistry

        cfg = AppConfig.model_validate(config)
        registry = AdapterRegistry(cfg.engine.served_model_name, cfg.adapters)
        self.llm = LLMEngine(cfg.engine, registry.paths())
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # Start the engine in the constructor: the replica counts as running (and gets traffic)
        # only once vLLM is ready to serve.
        t0 = time.monotonic()
        await self.llm.start()
        logger.info("vLLM engine started in %.1fs", time.monotonic() - t0)

    async def generate(self, kind: str, request, adapter: str | None) -> AsyncIterator:
        """kind: "chat" or "completion"; request: the vLLM protocol request object."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        yield ("replica", self.replica_id)
        error = await self.llm.ensure_adapter(adapter)
        if error is not None:
            yield ("error", error.model_dump())
            return
        serving = self.llm.serving_chat if kind == "chat" else self.llm.serving_completion
        create = serving.create_chat_completion if kind == "chat" else serving.create_completion
        try:
            result = await create(request, None)
        except Exception as exc:  # noqa: BLE001 - vLLM maps its validation errors to 400s
            # The same mapping vLLM's own API server applies to exceptions from these calls.
            result = serving.create_error_response(exc)
        if hasattr(result, "__aiter__"):
            async for chunk in result:
                yield ("sse", chunk)
        elif isinstance(result, ErrorResponse):
            yield ("error", result.model_dump())
        else:
            yield ("json", result.model_dump(exclude_none=False))

    async def record_routing_stats(self) -> dict[str, Any]:
        load = self.llm.load
        return {
            STAT_ACCELERATOR_ADAPTERS: list(load.recent_adapters),
            STAT_CPU_ADAPTERS: await self.llm.cpu_resident_adapters(),
            STAT_RUNNING: load.running,
            STAT_WAITING: load.waiting,
            STAT_KV_CACHE_USAGE: load.kv_cache_usage,
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        load = self.llm.load
        return {
            "running_requests": float(load.running),
            "waiting_requests": float(load.waiting),
            "kv_cache_usage": float(load.kv_cache_usage),
        }

    async def check_health(self) -> None:
        await self.llm.engine.check_health()


def engine_env_vars(extra: dict[str, str]) -> dict[str, str]:
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.update(extra)
    return env
