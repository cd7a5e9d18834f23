"""Configuration of the whole application: the `args` of serve_config.yaml, validated by pydantic.

Validated once, in `app.main.build_app`; each deployment is then bound with only the typed
pieces it needs (the ingress: tenants, adapter names and policies; the engine: engine settings
and adapter paths). Nothing here touches the file system beyond reading `tenants_file`.

Tenants, their API keys (stored as sha256 hex digests, never in clear) and their adapters are
declared inline or in a YAML file named by `tenants_file`. Validation errors name the bad field,
e.g. `adapters.2.owner: owner 'globx' is not a declared tenant`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.adapter_files import AdapterStorageConfig
from app.builtin_model import BUILTIN, BUILTIN_MODEL_NAME, cache_root
from app.quotas import TenantLimits
from app.request_policy import RequestLimits
from app.usage import UsageConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantConfig(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    # sha256 of each valid API key; rotate keys by listing old and new digests together.
    api_key_sha256: list[str] = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0, description="share of a saturated engine, in tokens")
    priority: Literal["interactive", "batch"] = "interactive"
    limits: TenantLimits = Field(default_factory=TenantLimits)

    @field_validator("api_key_sha256")
    @classmethod
    def _hex_digests(cls, digests: list[str]) -> list[str]:
        for d in digests:
            if not re.fullmatch(r"[0-9a-f]{64}", d):
                raise ValueError("each entry must be a lowercase sha256 hex digest (64 chars)")
        return digests


class AdapterConfig(_Strict):
    """A LoRA adapter in PEFT format. `path` is an s3:// prefix, an absolute local directory (on
    every engine node), or `builtin:<name>` for a demo adapter of the built-in model. Owned by one
    tenant (its name is local to that tenant), or `shared` with every tenant."""

    name: str = Field(pattern=NAME_PATTERN)
    path: str
    owner: str | None = None
    shared: bool = False

    @model_validator(mode="after")
    def _owner_or_shared(self) -> AdapterConfig:
        if self.owner is None and not self.shared:
            raise ValueError("an adapter needs an owner tenant or shared: true")
        return self


class EngineConfig(_Strict):
    """vLLM engine settings (one engine per replica). `extra_args` passes any other vLLM engine
    argument by its Python name (e.g. {enable_prefix_caching: true})."""

    model: str = BUILTIN  # a local model directory, or "builtin"
    served_model_name: str = Field(default=BUILTIN_MODEL_NAME, pattern=NAME_PATTERN)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    max_loras: int = Field(default=4, ge=1, description="adapter slots in one batch")
    max_cpu_loras: int = Field(default=8, ge=1, description="adapters cached in CPU memory")
    max_lora_rank: int = Field(default=16, ge=1, le=512)
    max_model_len: int = Field(default=2048, ge=16)
    max_num_seqs: int = Field(default=64, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool = False
    seed: int = 0
    # Serve tenants in proportion to their weights (in tokens) when the engine is saturated
    # (app/fair_queue.py); false: first come, first served (vLLM's own order).
    fair_sharing: bool = True
    # On CPU: run vLLM's EngineCore on the cores vLLM gave its worker, not on the cores left to
    # the replicas and the HTTP front (app/replica_env.py colocate_engine_core); no effect on GPU.
    colocate_engine_core: bool = True
    extra_args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cpu_cache_holds_slots(self) -> EngineConfig:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        return self


class EngineDeploymentConfig(_Strict):
    """Ray Serve settings of the engine deployment."""

    num_replicas: int | Literal["auto"] = 1
    max_ongoing_requests: int = Field(default=64, ge=1)
    # Requests waiting in the router for a replica beyond this get 503 + Retry-After.
    max_queued_requests: int = Field(default=256, ge=-1)
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1})
    autoscaling_config: dict[str, Any] | None = None
    # Ray replaces a replica after 3 failed checks in a row; the check is cheap (is vLLM's
    # engine alive), so check often: a dead engine is replaced in ~3 periods. Requests are
    # routed around it sooner, from its routing stats and its refusals (app/dispatch.py).
    health_check_period_s: float = Field(default=1.0, gt=0)
    health_check_timeout_s: float = Field(default=10.0, gt=0)
    # A replica being stopped (scale-down, redeploy, shutdown) takes no new requests and gets
    # this long to finish the ones it has: long generations must not be cut.
    graceful_shutdown_timeout_s: float = Field(default=120.0, ge=0)
    env_vars: dict[str, str] = Field(default_factory=dict)


class IngressDeploymentConfig(_Strict):
    """Ray Serve settings of the HTTP ingress. It only awaits engines, so one replica holds many
    requests; more replicas add HTTP parsing capacity, not model capacity."""

    num_replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(default=1024, ge=1)
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0.5})
    # Streams' text from the engines over a direct TCP connection instead of one Ray object
    # per chunk (app/token_link.py); off: everything through Ray (for comparison).
    token_link: bool = True
    # How the ingress calls the engine replicas: over Ray Serve's inter-deployment gRPC (each
    # replica runs that server; no Ray task and object per call and reply: +25-30% tokens/s at
    # rate inf on 2 cores, docs/serving.md), or as Ray actor calls (Serve's default).
    engine_calls: Literal["grpc", "ray"] = "grpc"


BATCH_PER_IMBALANCE = 8  # the default load bound is the batch over this


class RoutingConfig(_Strict):
    """The engine deployment's request router: ours, adapter-aware (app/request_router.py), or
    Ray Serve's default (power of two choices; it prefers replicas reporting the request's
    multiplexed model id, which our engine does not report, so it is blind to adapters). The
    second exists for comparison (benchmarks/routing/experiment.py)."""

    router: Literal["adapter_affinity", "ray_default"] = "adapter_affinity"
    # An adapter-holding replica is preferred only while its queue is at most this much longer
    # than the least-loaded replica's; beyond that the request goes where capacity is. Unset:
    # 1/8 of the engine's batch (`engine.max_num_seqs`), at least 1: a few requests' imbalance
    # matters to a 16-seat CPU engine (each extra sequence slows every step) and not to a
    # 128-seat GPU one (docs/benchmarks.md, routing experiment).
    imbalance_threshold: int | None = Field(default=None, ge=0)
    stats_period_s: float = Field(default=1.0, gt=0)


class AdminConfig(_Strict):
    """The admin API (app/admin_api.py): on only when at least one admin key digest is set."""

    api_key_sha256: list[str] = Field(default_factory=list)

    @field_validator("api_key_sha256")
    @classmethod
    def _hex_digests(cls, digests: list[str]) -> list[str]:
        return TenantConfig._hex_digests(digests)


class GatewayConfig(_Strict):
    """Tenant identity from an authenticating gateway in front (off by default): a request
    carrying `secret_header` whose sha256 is `secret_sha256` is the tenant named in
    `tenant_header`; without the secret the header is ignored and the API key counts."""

    tenant_header: str = "x-tenant-id"
    secret_header: str = "x-gateway-secret"
    secret_sha256: str

    @field_validator("secret_sha256")
    @classmethod
    def _hex_digest(cls, digest: str) -> str:
        return TenantConfig._hex_digests([digest])[0]


class RegistryConfig(_Strict):
    """Where the tenant and adapter registry is kept (SQLite; app/registry.py)."""

    path: str | None = None  # default: <the built-in model's cache root>/registry.sqlite


class AppConfig(_Strict):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    deployment: EngineDeploymentConfig = Field(default_factory=EngineDeploymentConfig)
    ingress: IngressDeploymentConfig = Field(default_factory=IngressDeploymentConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    tenants: list[TenantConfig] = Field(default_factory=list)
    adapters: list[AdapterConfig] = Field(default_factory=list)
    retry_after_s: int = Field(default=2, ge=1)
    request_limits: RequestLimits = Field(default_factory=RequestLimits)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    gateway: GatewayConfig | None = None
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    adapter_storage: AdapterStorageConfig = Field(default_factory=AdapterStorageConfig)
    usage: UsageConfig = Field(default_factory=UsageConfig)

    @model_validator(mode="after")
    def _consistent(self) -> AppConfig:
        tenant_names = [t.name for t in self.tenants]
        _no_duplicates(tenant_names, "tenants")
        _no_duplicates(
            [d for t in self.tenants for d in t.api_key_sha256] + self.admin.api_key_sha256,
            "api_key_sha256",
        )
        _no_duplicates([f"{a.owner or '(shared)'}/{a.name}" for a in self.adapters], "adapters")
        for a in self.adapters:
            if a.owner is not None and a.owner not in tenant_names:
                raise ValueError(f"adapter {a.name!r}: owner {a.owner!r} is not a declared tenant")
            if a.name == self.engine.served_model_name:
                raise ValueError(f"adapter {a.name!r} has the base model's name")
        return self

    @property
    def imbalance_threshold(self) -> int:
        """The request router's load bound: `routing.imbalance_threshold`, or the default
        derived from the engine's batch."""
        if self.routing.imbalance_threshold is not None:
            return self.routing.imbalance_threshold
        return max(1, self.engine.max_num_seqs // BATCH_PER_IMBALANCE)

    @property
    def registry_path(self) -> str:
        return self.registry.path or str(cache_root() / "registry.sqlite")

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> AppConfig:
        """From serve_config.yaml's `args`; `tenants_file` may hold `tenants` and `adapters`."""
        args = dict(args)
        if tenants_file := args.pop("tenants_file", None):
            extra = yaml.safe_load(Path(tenants_file).read_text()) or {}
            for key in ("tenants", "adapters"):
                args[key] = list(args.get(key, [])) + list(extra.get(key, []))
        return cls.model_validate(args)


def _no_duplicates(values: list[str], what: str) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise ValueError(f"duplicate entry in {what}: {v if what != 'api_key_sha256' else '…'}")
        seen.add(v)
