"""`import_path: app.main:build_app` of serve_config.yaml: the ingress in front of the engines.

The config is validated here, once; each deployment is bound with the typed pieces it needs:
the engine its settings and where to keep adapters; the Registry (tenants, keys, adapters; a
SQLite file) what the config declares, to seed it; the ingress handles to the engines, the
Registry and the Quotas replica, and its request policies.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from app.config import AppConfig
from app.engine import EngineDeployment, engine_env_vars
from app.ingress import Ingress
from app.quota_service import QuotaService
from app.registry_service import RegistryService
from app.replica_env import with_replica_env
from app.tenancy import GatewayTrust


def _router_config(cfg: AppConfig) -> RequestRouterConfig:
    """`routing.router`: ours by default; `ray_default` leaves Ray Serve's own router."""
    if cfg.routing.router == "ray_default":
        return RequestRouterConfig(request_routing_stats_period_s=cfg.routing.stats_period_s)
    return RequestRouterConfig(
        request_router_class="app.request_router:AdapterAffinityRequestRouter",
        request_router_kwargs={"imbalance_threshold": cfg.imbalance_threshold},
        request_routing_stats_period_s=cfg.routing.stats_period_s,
    )


def build_app(args: dict[str, Any]) -> Application:
    """A bad field fails `serve run` here, before anything starts."""
    cfg = AppConfig.from_args(args)
    dep = cfg.deployment
    options: dict[str, Any] = dict(
        max_ongoing_requests=dep.max_ongoing_requests,
        max_queued_requests=dep.max_queued_requests,
        ray_actor_options=with_replica_env(dep.ray_actor_options, engine_env_vars(dep.env_vars)),
        health_check_period_s=dep.health_check_period_s,
        health_check_timeout_s=dep.health_check_timeout_s,
        graceful_shutdown_timeout_s=dep.graceful_shutdown_timeout_s,
        request_router_config=_router_config(cfg),
    )
    if dep.autoscaling_config is not None:
        options["autoscaling_config"] = dep.autoscaling_config
    else:
        options["num_replicas"] = dep.num_replicas
    engine = EngineDeployment.options(**options).bind(cfg.engine, cfg.adapter_storage, cfg.usage)
    # Small shared state, no model: no CPU reserved, so they fit beside the engines anywhere.
    registry = RegistryService.options(ray_actor_options={"num_cpus": 0}).bind(
        cfg.registry_path, cfg.tenants, cfg.adapters, (cfg.engine.served_model_name,)
    )
    quotas = QuotaService.options(ray_actor_options={"num_cpus": 0}).bind()
    ingress = cfg.ingress
    return Ingress.options(
        num_replicas=ingress.num_replicas,
        max_ongoing_requests=ingress.max_ongoing_requests,
        ray_actor_options=with_replica_env(ingress.ray_actor_options, {}),
    ).bind(
        engine,
        registry,
        quotas,
        cfg.engine.served_model_name,
        cfg.retry_after_s,
        cfg.request_limits,
        cfg.admin.api_key_sha256,
        GatewayTrust(**cfg.gateway.model_dump()) if cfg.gateway else None,
        ingress.token_link,
        ingress.engine_calls,
    )
