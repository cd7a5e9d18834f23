"""Latency the ingress adds: the same 1-token chat request through HTTP + the Ingress deployment,
and straight to the engine deployment's handle from the driver (no HTTP, no auth).

    .venv/bin/python -m loadtest.router_overhead [--requests 200]

Prints a table (p50/p90 of both paths and their difference) and the engine replica start time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import httpx
import yaml

PORT = 8766


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()

    import ray
    from ray import serve
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from app.builtin_model import DEMO_TENANTS
    from app.contract import Accepted, ReplyHead, ReplyKind
    from app.main import build_app

    root = Path(__file__).resolve().parents[1]
    app_args = yaml.safe_load((root / "serve_config.yaml").read_text())["applications"][0]["args"]
    app_args["tenants_file"] = str(root / app_args["tenants_file"])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    t0 = time.monotonic()
    serve.run(build_app(app_args), name="moelora", route_prefix="/")
    start_s = time.monotonic() - t0

    tenant = DEMO_TENANTS[0]
    body = {
        "model": tenant.adapter,
        "max_tokens": 1,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Where is my order?"}],
    }
    auth = {"Authorization": f"Bearer {tenant.api_key}"}
    http = httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=60, headers=auth)
    engine = serve.get_deployment_handle("Engine", app_name="moelora").options(
        stream=True, multiplexed_model_id=tenant.adapter
    )

    def via_router():
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text

    def via_handle():
        request = ChatCompletionRequest.model_validate(body)
        items = list(engine.chat.remote(request))
        assert isinstance(items[0], Accepted), items
        assert isinstance(items[1], ReplyHead) and items[1].kind is ReplyKind.JSON, items

    timings = {}
    for name, fn in [("ingress (HTTP)", via_router), ("engine handle", via_handle)]:
        for _ in range(10):  # warm-up
            fn()
        samples = []
        for _ in range(args.requests):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1000)
        timings[name] = samples

    print(f"engine replica start (serve.run until ready): {start_s:.1f} s")
    print(f"{'path':<16} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8}")
    for name, s in timings.items():
        p50, p90, mean = percentile(s, 0.5), percentile(s, 0.9), statistics.mean(s)
        print(f"{name:<16} {p50:>8.2f} {p90:>8.2f} {mean:>8.2f}")
    added = percentile(timings["ingress (HTTP)"], 0.5) - percentile(timings["engine handle"], 0.5)
    print(f"ingress adds (p50 difference): {added:.2f} ms")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
