"""The real application for the integration tests: Ray Serve + 2 vLLM CPU engine replicas + our
plugin, started once for the whole package (tests/integration/conftest.py), and the ways tests
talk to it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import yaml

from app.builtin_model import BUILTIN_MODEL_NAME, DEMO_TENANTS

PORT = 8765
METRICS_PORT = 8766  # Ray's metrics export
BASE_URL = f"http://127.0.0.1:{PORT}"
KEYS = {t.name: t.api_key for t in DEMO_TENANTS}
OWN_ADAPTER = {t.name: t.adapter for t in DEMO_TENANTS}
BASE = BUILTIN_MODEL_NAME
MAX_MODEL_LEN = 256
MESSAGES = [{"role": "user", "content": "Where is my order?"}]


def app_args() -> dict:
    demo = yaml.safe_load((Path(__file__).resolve().parents[2] / "tenants.demo.yaml").read_text())
    return {
        "engine": {
            "model": "builtin",
            "served_model_name": BASE,
            "dtype": "float32",
            "max_loras": 2,
            "max_cpu_loras": 3,  # 5 adapters: more than slots and CPU cache
            "max_lora_rank": 16,
            "max_model_len": MAX_MODEL_LEN,
            "max_num_seqs": 16,
            "enforce_eager": True,
            # usage.prompt_tokens_details.cached_tokens shows prefix-cache hits (isolation test)
            "extra_args": {"enable_prefix_caching": True, "enable_prompt_tokens_details": True},
        },
        "deployment": {
            "num_replicas": 2,
            "max_ongoing_requests": 6,
            "max_queued_requests": 16,
            "ray_actor_options": {"num_cpus": 1},
        },
        "routing": {"imbalance_threshold": 2, "stats_period_s": 0.5},
        "request_limits": {"body_timeout_s": 8.0, "max_n": 4},
        "tenants": demo["tenants"],
        "adapters": demo["adapters"],
    }


@contextmanager
def running_app(
    args: dict,
    port: int = PORT,
    metrics_port: int = METRICS_PORT,
    include_dashboard: bool = False,
    **ray_init: object,
) -> Iterator[str]:
    """A fresh local Ray node in this process (Prometheus metrics on `metrics_port`) running the
    app built from `args` on 127.0.0.1:`port`; yields the base URL; shut down on exit."""
    import ray
    from ray import serve

    from app.main import build_app

    ray.init(
        num_cpus=8,
        include_dashboard=include_dashboard,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        **ray_init,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="moelora", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def client(tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key=KEYS[tenant], max_retries=0)


def post(path: str, body, key: str | None = KEYS["acme"], headers=None) -> httpx.Response:
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    if not isinstance(body, (str, bytes)):
        body = json.dumps(body)
    return httpx.post(f"{BASE_URL}{path}", content=body, headers=headers, timeout=60)


def chat_body(**overrides) -> dict:
    return {"model": BASE, "messages": MESSAGES, "max_tokens": 4, **overrides}


def assert_openai_error(resp: httpx.Response, status: int, err_type: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == status and err["message"]
    if err_type:
        assert err["type"] == err_type
    return err
