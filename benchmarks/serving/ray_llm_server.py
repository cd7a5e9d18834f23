"""Ray Serve LLM (`ray.serve.llm.build_openai_app`) on the built-in model, with the same engine
settings and adapters as this app, for the side-by-side benchmark (benchmarks/serving/compare.py).

    .venv/bin/python -m benchmarks.serving.ray_llm_server --port 8102 --adapters 16

Ray 2.60 loads LoRA adapters only from cloud storage (S3/GCS/Azure), so this starts a local
S3-compatible server (moto's) on 127.0.0.1, uploads the adapters there as
`s3://adapters/<name>/`, and points Ray Serve LLM at it; clients ask for `<base>:<name>`
(Ray Serve LLM's LoRA model ids). The engine gets serve_config.yaml's engine settings
(`app.engine.vllm_engine_args`, the fields the app's own engine gets), and vLLM loads this project's
plugin itself, as in our own engine. Runs until SIGINT/SIGTERM. Needs `pyarrow` and
`smart_open` (Ray Serve LLM's storage access): `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "adapters"


def bench_adapters(count: int) -> dict[str, str]:
    """`count` adapter names -> built-in demo adapter files, round robin over the demo files:
    distinct adapters to the engine (each its own LoRA slot), identical in weights."""
    from app.builtin_model import DEMO_TENANTS

    files = [t.adapter for t in DEMO_TENANTS]  # the built-in adapter files (4)
    return {f"bench-{i:02d}": files[i % len(files)] for i in range(count)}


def app_config():
    from app.config import AppConfig

    args = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    return AppConfig.from_args({**args, "tenants_file": str(ROOT / args["tenants_file"])})


def engine_config():
    return app_config().engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8102)
    parser.add_argument("--adapters", type=int, default=16)
    # As the app's engine deployment (serve_config.yaml), so both hold the same requests.
    ours = app_config().deployment.max_ongoing_requests
    parser.add_argument("--max-ongoing-requests", type=int, default=ours)
    args = parser.parse_args()

    import boto3
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    from app.builtin_model import ensure_builtin_model
    from app.engine import vllm_engine_args
    from app.model_files import resolve_model_path
    from tests.object_store import s3_server, upload_directory

    cfg = engine_config()
    paths = ensure_builtin_model()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with s3_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket=BUCKET)
        for name, demo in bench_adapters(args.adapters).items():
            upload_directory(s3, BUCKET, name, paths.adapter(demo))
        # Ray's workers inherit this process's environment (a local cluster started here):
        # the S3 endpoint and dummy credentials reach the replicas' downloads.
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": args.port})
            llm = LLMConfig(
                model_loading_config={
                    "model_id": cfg.served_model_name,
                    "model_source": resolve_model_path(cfg.model),
                },
                lora_config={
                    "dynamic_lora_loading_path": f"s3://{BUCKET}",
                    "max_num_adapters_per_replica": cfg.max_cpu_loras,
                },
                engine_kwargs=vllm_engine_args(cfg),
                deployment_config={
                    "num_replicas": 1,
                    "max_ongoing_requests": args.max_ongoing_requests,
                },
                # One CPU bundle: the default asks for an accelerator this machine lacks.
                placement_group_config={"bundles": [{"CPU": 1}]},
            )
            serve.run(build_openai_app({"llm_configs": [llm]}), blocking=False)
            print("READY", flush=True)
            stop.wait()
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
