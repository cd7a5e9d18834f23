"""Round-trip latency of small requests, sent one at a time with a pause before each: what a
request costs when the machine was idle just before it (light load), against plain vLLM.

    .venv/bin/python -m benchmarks.serving.idle_latency --systems app-haproxy,vllm --gaps 0.01,0.1

Per system (started as benchmarks/serving/compare.py starts it) and pause: `GET /health`, a
`POST /v1/chat/completions` refused for its API key (401: the HTTP path and auth only) and one
refused by vLLM's validators (400: the body parsed and validated), `--requests` of each. The
app is also measured on its ingress replica's own port (no HAProxy hop) when it has one.
Prints p50/p90 ms per case and writes every sample to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

from benchmarks.serving import compare

PORT = 8000
WARMUP = 20


def ingress_ports(proc) -> list[int]:
    """The HTTP ports the app's ingress replicas listen on themselves (HAProxy forwards there):
    those in Ray Serve's direct-ingress HTTP port range."""
    from ray.serve._private.constants import (
        RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT,
        RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT,
    )

    direct = range(RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT)
    ports = set()
    for p in compare.session_processes(proc):
        try:
            if "Ingress" not in " ".join(p.cmdline()):
                continue
            listening = [c.laddr.port for c in p.net_connections("tcp") if c.status == "LISTEN"]
        except psutil.Error:
            continue
        ports.update(port for port in listening if port in direct)
    return sorted(ports)


def samples(client: httpx.Client, gap_s: float, n: int, method: str, url: str, **kw) -> list:
    out = []
    for _ in range(n + WARMUP):
        time.sleep(gap_s)
        t0 = time.perf_counter()
        r = client.request(method, url, **kw)
        out.append(round((time.perf_counter() - t0) * 1000, 3))
        if r.status_code >= 500:
            raise RuntimeError(f"{url}: {r.status_code} {r.text[:200]}")
    return out[WARMUP:]


def cases(base_model: str) -> dict[str, dict]:
    body = {
        "model": base_model,
        "max_tokens": 32,
        "stream": True,
        "messages": [{"role": "user", "content": "hello " * 60}],
    }
    key = {"Authorization": f"Bearer {compare.BENCH_KEY}"}
    return {
        "GET /health": dict(method="GET", path="/health"),
        "POST 401": dict(
            method="POST",
            path="/v1/chat/completions",
            json=body,
            headers={"Authorization": "Bearer sk-not-a-key"},
        ),
        "POST 400": dict(
            method="POST", path="/v1/chat/completions", json=body | {"temperature": -1}, headers=key
        ),
    }


def measure(system: str, gaps: list[float], n: int) -> dict:
    proc = compare.start(system, PORT, Path(f"/tmp/idle_latency_{system}.log"))
    results: dict[str, dict] = {}
    try:
        base, _ = compare.model_names(system)
        compare.wait_ready(PORT, base)
        ports = {"front": PORT} | {f"replica:{p}": p for p in ingress_ports(proc)}
        with httpx.Client(timeout=30) as client:
            for gap in gaps:
                for where, port in ports.items():
                    for name, case in cases(base).items():
                        spec = dict(case)
                        url = f"http://127.0.0.1:{port}{spec.pop('path')}"
                        ms = samples(client, gap, n, spec.pop("method"), url, **spec)
                        key = f"{name} via {where}, gap {gap * 1000:g} ms"
                        p50, p90 = statistics.median(ms), sorted(ms)[int(0.9 * len(ms))]
                        results[key] = {"p50": p50, "p90": p90, "samples": ms}
                        print(f"{system:12} {key:42} p50 {p50:6.2f}  p90 {p90:6.2f}")
    finally:
        compare.stop(proc)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default="app-haproxy,vllm")
    parser.add_argument("--gaps", default="0.01,0.1", help="pause before each request, s")
    parser.add_argument("--requests", type=int, default=150, help="per case, after 20 warm-up")
    parser.add_argument("--out", type=Path, default=Path("/tmp/idle_latency.json"))
    args = parser.parse_args()
    gaps = [float(g) for g in args.gaps.split(",")]
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": compare.versions(),
        "cpus": psutil.cpu_count(),
        "systems": {s: measure(s, gaps, args.requests) for s in args.systems.split(",")},
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
