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
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from ray import serve

from app.adapter_files import AdapterFiles, AdapterStorageConfig
from app.adapter_store import AdapterFetchError
from app.adapter_validation import AdapterRejected
from app.config import EngineConfig
from app.contract import (
    Accepted,
    AdapterRef,
    AutoscalingStat,
    EngineUnavailable,
    ReplyHead,
    ReplyItem,
    ReplyKind,
    ReplyTail,
    RequestContext,
    RoutingStats,
)
from app.fair_queue import FairQueue
from app.logs import get_logger
from app.metrics import EngineMetrics
from app.model_files import resolve_adapter_path, resolve_model_path
from app.openai_errors import error_body
from app.replica_env import colocate_engine_core, reset_niceness
from app.request_policy import prompt_chars
from app.token_link import TokenLinks
from app.usage import UsageConfig, UsageFile, UsageLedger

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


def vllm_engine_args(cfg: EngineConfig) -> dict[str, Any]:
    """Our engine config as vLLM engine arguments (AsyncEngineArgs field names), model and
    served name excluded: what every system given "the same engine settings" gets."""
    return {
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


def vllm_cli_args(cfg: EngineConfig) -> list[str]:
    """Our engine config as `vllm serve` flags, so vLLM's own parser fills every default."""
    args = {
        "model": resolve_model_path(cfg.model),
        "served_model_name": cfg.served_model_name,
        **vllm_engine_args(cfg),
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


@dataclass(frozen=True)
class ModelNames:
    """The model name the client sent and the one vLLM knows the adapter version by (unique per
    tenant and version, e.g. `acme/support/v3`): vLLM writes its name into every reply, the
    client gets its own back. A plain text swap of the JSON member: vLLM serialises it compactly
    and names are plain ASCII, so there is no other spelling to miss."""

    client: str
    engine: str

    def to_client(self, text: str) -> str:
        if self.client == self.engine:
            return text
        return text.replace(
            f'"model":{json.dumps(self.engine)}', f'"model":{json.dumps(self.client)}'
        )


def fair_reserve(seats: int) -> int:
    """Seats no single tenant may take, so that another tenant's request starts at once even
    while one tenant floods the replica: an eighth of them, at least one (none if only one)."""
    return 0 if seats < 2 else max(1, seats // 8)


def engine_batch(cfg: EngineConfig) -> int:
    """The sequences vLLM runs at once (its max_num_seqs). With fair sharing the reserve comes
    on top of `max_num_seqs`, not out of it: a tenant alone gets `max_num_seqs` (as from plain
    vLLM with that setting) and another tenant's request still starts at once. Carved out of
    it, the reserve idled 1/8 of the batch whenever one tenant had the replica to itself."""
    if not cfg.fair_sharing:
        return cfg.max_num_seqs
    return cfg.max_num_seqs + fair_reserve(cfg.max_num_seqs)


# While one tenant floods, seats stay ready for every other tenant active in the last 10 s
# (between its requests, one a second or so, too): two each, since a light tenant often has two
# requests in flight (with one each, the flood benchmark's light p99 TTFT stayed 3-4.4x unloaded).
FAIR_RECENT_WINDOW_S = 10.0
FAIR_SEATS_PER_ACTIVE_TENANT = 2


def make_fair_queue(cfg: EngineConfig) -> FairQueue:
    """Admission to vLLM's `engine_batch(cfg)` sequences: the rest wait in it, served fairly
    among tenants (by weight, in tokens) instead of first come, first served."""
    if not cfg.fair_sharing:
        return FairQueue(1_000_000)  # never queues: vLLM's own order
    return FairQueue(
        engine_batch(cfg),
        reserve=fair_reserve(cfg.max_num_seqs),
        recent_window_s=FAIR_RECENT_WINDOW_S,
        seats_per_active=FAIR_SEATS_PER_ACTIVE_TENANT,
    )


def reserved_tokens(request) -> float:
    """What a request may cost, in tokens, before it runs (fair sharing charges this when it
    starts and corrects it when it ends): a prompt estimate (about 4 characters a token) plus
    every sequence's output budget."""
    max_out = getattr(request, "max_completion_tokens", None) or request.max_tokens or 256
    # Never negative: a bad budget (max_tokens -5) is vLLM's to refuse with a 400, after this.
    return prompt_chars(request) / 4 + max(0, max_out) * max(1, request.n or 1)


def _error_head(status: HTTPStatus, message: str) -> ReplyHead:
    body = json.dumps(error_body(status, message)).encode()
    return ReplyHead(ReplyKind.ERROR, status, body)


def _serving_request():
    """The `raw_request` vLLM's serving methods take: a server-made Starlette request with no
    client headers (a client never reaches vLLM's header-driven knobs such as priority or
    data-parallel rank), whose `state` receives vLLM's final usage of the request."""
    from starlette.requests import Request

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []})


class VLLMEngine:
    """The vLLM engine, its OpenAI serving objects and the adapter versions it has loaded."""

    def __init__(self, cfg: EngineConfig, storage: AdapterStorageConfig, replica_id: str = ""):
        self.cfg = cfg
        self.replica_id = replica_id
        self.load = SchedulerLoad()
        self.adapter_files = AdapterFiles(resolve_model_path(cfg.model), cfg.max_lora_rank, storage)
        self.engine = None
        self.serving_chat = None
        self.serving_completion = None
        self.models = None
        self._adapter_locks: dict[str, asyncio.Lock] = {}
        self._in_flight: Counter[str] = Counter()  # requests per adapter engine name
        self._host_pinned: set[str] = set()  # adapter versions pinned in vLLM's host cache
        self._lineage: dict[str, str] = {}  # loaded adapter version -> its lineage
        # Adapters in vLLM's host cache, as last asked. Asked again only while something can have
        # changed it: every ask is an RPC to vLLM's worker, and a CPU worker busy-polls for a
        # second after each, i.e. forever at one ask per routing-stats period (a core burnt idle).
        self._cpu_adapters: list[str] = []
        self._cpu_adapters_stale = True
        self.metrics = None  # EngineMetrics inside a Ray replica
        self.usage = UsageLedger()
        self.token_links = TokenLinks()  # streams' text to the ingress replicas
        self._busy_exported = 0.0  # of usage.busy_seconds, in the busy-seconds counter
        self.fair_queue = make_fair_queue(cfg)

    async def start(self) -> None:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        # vLLM's batch: `max_num_seqs` plus the fair-sharing reserve (engine_batch).
        batch = self.cfg.model_copy(update={"max_num_seqs": engine_batch(self.cfg)})
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_cli_args(batch))
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
        if self.cfg.colocate_engine_core:
            colocate_engine_core()
        state = State()
        await init_app_state(
            self.engine, state, args, supported_tasks=await self.engine.get_supported_tasks()
        )
        self.serving_chat = state.openai_serving_chat
        self.serving_completion = state.openai_serving_completion
        self.models = state.openai_serving_models

    async def ensure_adapter(
        self, ref: AdapterRef | None, pinned: bool = False
    ) -> ReplyHead | None:
        """Load the adapter version into vLLM on first use (fetched and validated on this node;
        vLLM then caches it: LRU over max_cpu_loras in memory, max_loras slots per batch). A
        pinned tenant's version is pinned in host memory (vLLM never evicts it) and in the
        node's disk cache. An error head if it cannot be loaded, else None."""
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        if ref is None or ref.engine_name in self.models.lora_requests:
            return None
        async with self._adapter_locks.setdefault(ref.engine_name, asyncio.Lock()):
            if ref.engine_name in self.models.lora_requests:  # loaded meanwhile
                return None
            t0 = time.monotonic()
            try:
                path = await asyncio.to_thread(self.adapter_files.local_copy, ref.uri, ref.sha256)
            except (AdapterFetchError, AdapterRejected) as exc:
                logger.error("adapter %s cannot be loaded: %s", ref.engine_name, exc)
                if self.metrics:
                    self.metrics.adapter_loads.inc(1, tags={"outcome": "rejected"})
                return _error_head(
                    HTTPStatus.SERVICE_UNAVAILABLE, f"The adapter cannot be loaded: {exc}"
                )
            result = await self.models.load_lora_adapter(
                LoadLoRAAdapterRequest(lora_name=ref.engine_name, lora_path=str(path))
            )
            self._cpu_adapters_stale = True
            elapsed = time.monotonic() - t0
            logger.info("adapter %s loaded in %.3fs", ref.engine_name, elapsed)
            if self.metrics:
                self.metrics.adapter_loads.inc(1, tags={"outcome": "loaded"})
                self.metrics.adapter_load_time.observe(elapsed)
        if not isinstance(result, str):
            return ReplyHead(ReplyKind.ERROR, result.error.code, result.model_dump_json().encode())
        self._retire_older_versions(ref)
        if pinned:
            await self._pin(ref)
        return None

    async def _pin(self, ref: AdapterRef) -> None:
        """Pinned on the node's disk always; in vLLM's host cache (our plugin makes that host
        memory only) while fewer than max_cpu_loras - max_loras are: the cache must keep room
        for the adapters of a full batch, or vLLM could not load one and its engine would die."""
        await asyncio.to_thread(self.adapter_files.store.pin, resolve_adapter_path(ref.uri))
        lora = self.models.lora_requests.get(ref.engine_name)
        room = self.cfg.max_cpu_loras - self.cfg.max_loras - len(self._host_pinned)
        if lora is None or ref.engine_name in self._host_pinned:
            return
        if room <= 0:
            logger.warning(
                "adapter %s pinned on disk only: %d already pinned in host memory (at most "
                "max_cpu_loras - max_loras)", ref.engine_name, len(self._host_pinned),
            )  # fmt: skip
            return
        if await self.engine.pin_lora(lora.lora_int_id):
            self._host_pinned.add(ref.engine_name)
            logger.info("adapter %s pinned (tenant configured as pinned)", ref.engine_name)

    def _retire_older_versions(self, ref: AdapterRef) -> None:
        """Unload earlier versions of the same adapter once nothing runs on them: requests in
        flight finish on the version they started with, new ones get the new version."""
        if not ref.lineage:
            return
        self._lineage[ref.engine_name] = ref.lineage
        for name, lineage in list(self._lineage.items()):
            if lineage == ref.lineage and name != ref.engine_name and not self._in_flight[name]:
                del self._lineage[name]
                asyncio.get_running_loop().create_task(self._unload(name))

    async def _unload(self, name: str) -> None:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        await self.models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        self._cpu_adapters_stale = True
        self._host_pinned.discard(name)
        logger.info("adapter %s unloaded (replaced by a newer version)", name)

    async def cpu_resident_adapters(self) -> list[str]:
        """vLLM's host-cache residents; asked only if an adapter was loaded, unloaded, requested
        or running since the last ask (vLLM loads and evicts only then)."""
        running_adapters = any(n and count for n, count in self._in_flight.items())
        if self._cpu_adapters_stale or running_adapters:
            self._cpu_adapters_stale = False  # a change during the ask marks it stale again
            ids = await self.engine.list_loras()
            lora_requests = self.models.lora_requests.items()
            self._cpu_adapters = [n for n, r in lora_requests if r.lora_int_id in ids]
        return list(self._cpu_adapters)

    def chat(self, request, context: RequestContext) -> AsyncIterator[ReplyItem]:
        serving = self.serving_chat
        return self._reply(serving, serving.create_chat_completion, request, context)

    def completion(self, request, context: RequestContext) -> AsyncIterator[ReplyItem]:
        serving = self.serving_completion
        return self._reply(serving, serving.create_completion, request, context)

    async def _reply(
        self, serving, create: Callable[..., Awaitable[Any]], request, context: RequestContext
    ) -> AsyncIterator[ReplyItem]:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        if not self.serving:
            # Before Accepted: the ingress retries elsewhere instead of answering an error.
            raise EngineUnavailable(self.replica_id)
        yield Accepted(self.replica_id)
        adapter = context.adapter
        error = await self.ensure_adapter(adapter, pinned=context.pinned)
        if error is not None:
            yield error
            return
        names = ModelNames(request.model, adapter.engine_name if adapter else request.model)
        request.model = names.engine
        in_flight = adapter.engine_name if adapter else ""
        queued_at = time.monotonic()
        seat = await self.fair_queue.acquire(
            context.tenant,
            weight=context.weight,
            priority=context.priority,
            seats=request.n or 1,
            cost=reserved_tokens(request),
        )
        if self.metrics:
            wait = time.monotonic() - queued_at
            self.metrics.queue_wait.observe(wait, tags={"tenant": context.tenant})
        self._in_flight[in_flight] += 1
        self._cpu_adapters_stale |= bool(in_flight)  # vLLM may load it into its host cache
        mark = self.usage.enter()
        used_tokens = None
        tokens: tuple[int | None, int | None] = (None, None)  # prompt, completion (vLLM's)
        try:
            raw_request = _serving_request()
            try:
                result = await create(request, raw_request)
            except Exception as exc:  # noqa: BLE001 - vLLM maps its validation errors to 400s
                # The same mapping vLLM's own API server applies to exceptions from these calls.
                result = serving.create_error_response(exc)
            if isinstance(result, ErrorResponse):
                used_tokens = 0  # refused before generating: no share used
                body = names.to_client(result.model_dump_json())
                yield ReplyHead(ReplyKind.ERROR, result.error.code, body.encode())
            elif hasattr(result, "__aiter__"):
                outgoing = await self.token_links.open(context.reply_to)
                yield ReplyHead(ReplyKind.STREAM)
                async for text in outgoing.deliver(result, names.to_client):
                    yield text  # only when there is no token link
                usage = getattr(raw_request.state, "request_metadata", None)
                usage = usage.final_usage_info if usage is not None else None
                if usage:
                    used_tokens = usage.total_tokens
                    tokens = (usage.prompt_tokens, usage.completion_tokens)
                yield ReplyTail(*tokens, linked=outgoing.linked)
            else:
                usage = result.usage
                if usage:
                    used_tokens = usage.total_tokens
                    tokens = (usage.prompt_tokens, usage.completion_tokens)
                yield ReplyHead(
                    ReplyKind.JSON,
                    body=names.to_client(result.model_dump_json()).encode(),
                    prompt_tokens=tokens[0],
                    completion_tokens=tokens[1],
                )
        finally:
            self._in_flight[in_flight] -= 1
            self.fair_queue.release(seat, used_tokens)
            self._charge(mark, context.tenant, *tokens)

    def _charge(self, mark: float, tenant: str, prompt: int | None, completion: int | None) -> None:
        engine_seconds = self.usage.leave(mark, tenant, prompt, completion)
        if self.metrics:
            self.metrics.engine_seconds.inc(engine_seconds, tags={"tenant": tenant})
            busy = self.usage.busy_seconds
            self.metrics.busy_seconds.inc(busy - self._busy_exported)
            self._busy_exported = busy

    @property
    def serving(self) -> bool:
        """False once vLLM's engine has failed (e.g. EngineCore died); it never recovers, and
        the replica then exits (EngineDeployment) so that Ray replaces it."""
        return self.engine is not None and not self.engine.errored

    async def routing_stats(self) -> RoutingStats:
        if not self.serving:
            return RoutingStats(serving=False)
        load = self.load
        cpu_adapters = await self.cpu_resident_adapters()
        if self.metrics:
            self.metrics.resident.set(len(load.recent_adapters), tags={"tier": "accelerator"})
            self.metrics.resident.set(len(cpu_adapters), tags={"tier": "cpu"})
        return RoutingStats(
            accelerator_adapters=list(load.recent_adapters),
            cpu_adapters=cpu_adapters,
            running=load.running,
            waiting=load.waiting,
            kv_cache_usage=load.kv_cache_usage,
            serving=self.serving,
        )


@serve.deployment(name="Engine")
class EngineDeployment:
    """Ray Serve replica around one VLLMEngine: one method per endpoint (app/contract.py)."""

    async def __init__(
        self, engine: EngineConfig, storage: AdapterStorageConfig, usage: UsageConfig
    ):
        reset_niceness()  # before vLLM starts its processes: they inherit it
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.llm = VLLMEngine(engine, storage, replica_id)
        self.llm.metrics = EngineMetrics()
        self._usage_file = UsageFile(usage.dir, replica_id) if usage.dir else None
        # Start the engine in the constructor: the replica counts as running (and gets traffic)
        # only once vLLM is ready to serve.
        t0 = time.monotonic()
        await self.llm.start()
        logger.info("vLLM engine started in %.1fs", time.monotonic() - t0)
        loop = asyncio.get_running_loop()
        self._watch = loop.create_task(self._exit_when_engine_dies())
        if self._usage_file:
            self._usage_writer = loop.create_task(self._write_usage(usage.period_s))

    async def _write_usage(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            self._flush_usage()

    def _flush_usage(self) -> None:
        try:
            self._usage_file.append(self.llm.usage.take_period())
        except OSError:  # a full or unwritable disk must not stop serving; the metrics remain
            logger.exception("usage file %s not written", self._usage_file.path)

    def __del__(self):
        # Serve calls this on a graceful stop (scale-down, redeploy): the last partial period.
        if getattr(self, "_usage_file", None):
            self._flush_usage()

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
    async def chat(self, request, context: RequestContext) -> AsyncIterator[ReplyItem]:
        async for item in self.llm.chat(request, context):
            yield item

    async def completion(self, request, context: RequestContext) -> AsyncIterator[ReplyItem]:
        async for item in self.llm.completion(request, context):
            yield item

    async def validate_adapter(self, uri: str) -> dict[str, Any]:
        """For registration (app/admin_api.py): fetch and validate on an engine node, where the
        base model is. The validated facts, or {"error": <the problem>}."""
        try:
            _, adapter = await asyncio.to_thread(self.llm.adapter_files.validated, uri)
        except (AdapterFetchError, AdapterRejected) as exc:
            return {"error": str(exc)}
        return {"sha256": adapter.sha256, "rank": adapter.rank, "size_bytes": adapter.size_bytes}

    async def record_routing_stats(self) -> dict[str, Any]:
        return (await self.llm.routing_stats()).as_dict()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        load = self.llm.load
        return {
            AutoscalingStat.RUNNING_REQUESTS.value: float(load.running),
            # Requests in our fair queue wait for vLLM as much as those in vLLM's own queue.
            AutoscalingStat.WAITING_REQUESTS.value: float(
                load.waiting + self.llm.fair_queue.waiting_requests
            ),
            AutoscalingStat.KV_CACHE_USAGE.value: float(load.kv_cache_usage),
        }

    async def check_health(self) -> None:
        await self.llm.engine.check_health()


def engine_env_vars(extra: dict[str, str]) -> dict[str, str]:
    """Environment of an engine replica. On CPU, vLLM sizes its KV cache from this (GiB)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.update(extra)
    return env
