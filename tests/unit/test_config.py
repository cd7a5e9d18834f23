"""serve_config validation: good files load, bad fields are named, the app graph builds offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from app.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]
SHA = "a" * 64


def app_args(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())["applications"][0]["args"]


def load(args: dict) -> AppConfig:
    return AppConfig.from_args({**args, "tenants_file": str(ROOT / args["tenants_file"])})


@pytest.mark.parametrize("path", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_shipped_configs_validate(path):
    cfg = load(app_args(path))
    assert cfg.tenants and cfg.adapters
    assert all(len(d) == 64 for t in cfg.tenants for d in t.api_key_sha256)


def test_gpu_config_builds_the_app_graph_without_starting_engines():
    from ray.serve import Application

    from app.main import build_app

    args = app_args("serve_config.gpu.yaml")
    app = build_app({**args, "tenants_file": str(ROOT / args["tenants_file"])})
    assert isinstance(app, Application)
    engine = app._bound_deployment.init_args[0]._bound_deployment  # Ingress.bind(engine, ...)
    assert engine.ray_actor_options["num_gpus"] == 1
    autoscaling = engine._deployment_config.autoscaling_config
    assert autoscaling.max_replicas == 8
    assert autoscaling.policy.policy_function == "app.autoscaling:UtilizationPolicy"
    router_cfg = engine._deployment_config.request_router_config
    assert router_cfg.request_router_class == "app.request_router:AdapterAffinityRequestRouter"
    assert autoscaling.policy.policy_kwargs["target_requests_per_replica"] == 48
    # The engine is bound with its typed settings, where to keep adapters and where to write
    # usage; tenants and adapters go to the Registry (which seeds its SQLite file from them).
    engine_cfg, storage, usage = engine.init_args
    assert usage.dir is None and usage.period_s == 60
    assert engine_cfg.served_model_name == "qwen3-30b-a3b"
    assert storage.cache_max_bytes > 0
    registry = app._bound_deployment.init_args[1]._bound_deployment
    path, tenants, adapters, reserved = registry.init_args
    assert path.endswith(".sqlite") and reserved == ("qwen3-30b-a3b",)
    assert any(a.name == "sql-assistant" and a.path == "/adapters/sql-assistant" for a in adapters)


def _error_locations(exc: ValidationError) -> list[str]:
    return [".".join(str(x) for x in e["loc"]) for e in exc.errors()]


@pytest.mark.parametrize(
    ("args", "location"),
    [
        ({"engine": {"max_loras": 0}}, "engine.max_loras"),
        ({"engine": {"dtype": "int3"}}, "engine.dtype"),
        ({"engine": {"max_lora_rank": "big"}}, "engine.max_lora_rank"),
        ({"deployment": {"num_replicas": "many"}}, "deployment.num_replicas"),
        (
            {"tenants": [{"name": "a", "api_key_sha256": ["not-a-digest"]}]},
            "tenants.0.api_key_sha256",
        ),
        ({"tenants": [{"name": "bad name!", "api_key_sha256": [SHA]}]}, "tenants.0.name"),
        ({"adapters": [{"name": "x", "path": "/p"}]}, "adapters.0"),
        ({"engine": {"unknown_knob": 1}}, "engine.unknown_knob"),
    ],
)
def test_bad_fields_are_named(args, location):
    with pytest.raises(ValidationError) as info:
        AppConfig.from_args(args)
    assert any(loc.startswith(location) for loc in _error_locations(info.value)), info.value


def test_adapter_owner_must_be_a_tenant():
    with pytest.raises(ValidationError, match="owner 'globx' is not a declared tenant"):
        AppConfig.from_args(
            {
                "tenants": [{"name": "globex", "api_key_sha256": [SHA]}],
                "adapters": [{"name": "legal", "path": "/p", "owner": "globx"}],
            }
        )


def test_duplicate_keys_across_tenants_are_rejected_without_echoing_them():
    with pytest.raises(ValidationError) as info:
        AppConfig.from_args(
            {
                "tenants": [
                    {"name": "a", "api_key_sha256": [SHA]},
                    {"name": "b", "api_key_sha256": [SHA]},
                ],
            }
        )
    assert "duplicate entry in api_key_sha256" in str(info.value)
    assert SHA not in str(info.value).split("input_value")[0]


def test_cpu_lora_cache_must_hold_the_slots():
    with pytest.raises(ValidationError, match="max_cpu_loras must be >= max_loras"):
        AppConfig.from_args({"engine": {"max_loras": 8, "max_cpu_loras": 4}})


def test_engine_config_becomes_vllm_flags_parsed_by_vllm():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from app.config import EngineConfig
    from app.engine import vllm_cli_args

    cfg = EngineConfig(
        model="/m",
        max_loras=3,
        enforce_eager=False,
        extra_args={"enable_prefix_caching": False, "max_num_batched_tokens": 4096},
    )
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_cli_args(cfg))
    assert (args.model, args.max_loras, args.enable_lora) == ("/m", 3, True)
    assert args.enforce_eager is False and args.enable_prefix_caching is False
    assert args.max_num_batched_tokens == 4096


def _engine_router_class(args: dict) -> str:
    from app.main import build_app

    app = build_app(args)
    engine = app._bound_deployment.init_args[0]._bound_deployment
    return engine._deployment_config.request_router_config.request_router_class


def test_router_switch_defaults_to_ours_and_can_pick_rays_default():
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

    assert AppConfig.from_args({}).routing.router == "adapter_affinity"
    ours = _engine_router_class({})
    assert ours == "app.request_router:AdapterAffinityRequestRouter"
    default = _engine_router_class({"routing": {"router": "ray_default"}})
    assert default.endswith(PowerOfTwoChoicesRequestRouter.__name__)
    with pytest.raises(ValidationError) as info:
        AppConfig.from_args({"routing": {"router": "round_robin"}})
    assert _error_locations(info.value) == ["routing.router"]


def _engine_router_kwargs(args: dict) -> dict:
    from app.main import build_app

    engine = build_app(args)._bound_deployment.init_args[0]._bound_deployment
    return engine._deployment_config.request_router_config.request_router_kwargs


@pytest.mark.parametrize(("max_num_seqs", "bound"), [(16, 2), (64, 8), (128, 16), (4, 1), (1, 1)])
def test_router_load_bound_defaults_to_an_eighth_of_the_batch(max_num_seqs, bound):
    args = {"engine": {"max_num_seqs": max_num_seqs}}
    assert AppConfig.from_args(args).imbalance_threshold == bound
    assert _engine_router_kwargs(args) == {"imbalance_threshold": bound}


def test_router_load_bound_set_explicitly_wins_even_at_zero():
    for bound in (0, 5):
        args = {"engine": {"max_num_seqs": 128}, "routing": {"imbalance_threshold": bound}}
        assert _engine_router_kwargs(args) == {"imbalance_threshold": bound}
