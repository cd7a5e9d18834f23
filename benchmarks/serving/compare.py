"""The serving layer against plain vLLM: `vllm bench serve` against this app and against `vllm
serve` on the same model, engine flags and plugin, one system after the other, then ratio tables.

    .venv/bin/python -m benchmarks.serving.compare                     # app vs plain vLLM
    .venv/bin/python -m benchmarks.serving.compare --systems app,app-direct,vllm --runs 3

Systems:
  app         `serve run serve_config.yaml` (Ray Serve proxy -> Ingress -> Engine)
  app-direct  the same with RAY_SERVE_ENABLE_DIRECT_INGRESS=1, the client on the ingress
              replica's own HTTP port (no Python proxy hop)
  vllm        `vllm serve` with the flags serve_config.yaml gives the engine
              (app.engine.vllm_cli_args), the same adapter as a --lora-modules entry
Scenarios: rate inf and 4 req/s, base model and a demo tenant's adapter (random dataset, 64
prompts, input 64, output 32, ignore_eos). Prints one table per scenario (median over runs) and
the app/vllm ratios, and writes every run's numbers to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")


def app_config() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def engine_flags() -> list[str]:
    from app.config import AppConfig
    from app.engine import vllm_cli_args

    args = app_config()["applications"][0]["args"]
    cfg = AppConfig.from_args({**args, "tenants_file": str(ROOT / args["tenants_file"])})
    return vllm_cli_args(cfg.engine)


def client_port(system: str, port: int) -> int:
    """Where the client connects: the ingress replica itself in direct-ingress mode."""
    return port + 100 if system == "app-direct" else port


def start(system: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    if system in ("app", "app-direct"):
        cfg = app_config()
        cfg["http_options"]["port"] = port
        cfg["http_options"]["host"] = "127.0.0.1"
        path = Path(tempfile.mkdtemp()) / "serve_config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        if system == "app-direct":
            env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
            env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(client_port(system, port))
        cmd = [str(ROOT / ".venv/bin/serve"), "run", str(path)]
    elif system == "vllm":
        from app.builtin_model import DEMO_TENANTS, ensure_builtin_model

        paths = ensure_builtin_model()
        adapter = DEMO_TENANTS[0].adapter
        cmd = [sys.executable, "-m", "benchmarks.serving.vllm_cli", "serve", *engine_flags()]
        cmd += ["--port", str(port), "--host", "127.0.0.1"]
        cmd += ["--lora-modules", f"{adapter}={paths.adapter(adapter)}"]
        cmd += ["--api-key", DEMO_TENANTS[0].api_key]
    else:
        raise ValueError(system)
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(port: int, api_key: str, model: str, timeout_s: float = 300) -> float:
    """Seconds until one chat completion succeeds."""
    t0 = time.monotonic()
    body = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    while time.monotonic() - t0 < timeout_s:
        try:
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=60,
            )
            if r.status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"nothing answered on port {port} within {timeout_s}s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run([str(ROOT / ".venv/bin/ray"), "stop", "--force"], capture_output=True)


def bench(port: int, model: str, rate: str, seed: int, api_key: str) -> dict:
    from app.builtin_model import ensure_builtin_model

    out = Path(tempfile.mkdtemp())
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.serving.vllm_cli",
        "bench",
        "serve",
        "--backend",
        "openai-chat",
        "--endpoint",
        "/v1/chat/completions",
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--model",
        model,
        "--tokenizer",
        str(ensure_builtin_model().model),
        "--dataset-name",
        "random",
        "--random-input-len",
        "64",
        "--random-output-len",
        "32",
        "--num-prompts",
        "64",
        "--ignore-eos",
        "--request-rate",
        rate,
        "--seed",
        str(seed),
        "--percentile-metrics",
        "ttft,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        str(out),
        "--result-filename",
        "r.json",
        "--disable-tqdm",
    ]
    env = {**os.environ, "OPENAI_API_KEY": api_key}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    result = json.loads((out / "r.json").read_text())
    return {m: result[m] for m in METRICS} | {"failed": result.get("failed", 0)}


def main() -> None:
    from app.builtin_model import BUILTIN_MODEL_NAME, DEMO_TENANTS

    parser = argparse.ArgumentParser()
    parser.add_argument("--systems", default="app,vllm")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rates", default="inf,4")
    parser.add_argument("--models", default="adapter,base")
    parser.add_argument("--out", type=Path, default=Path("/tmp/serving_compare.json"))
    args = parser.parse_args()
    tenant = DEMO_TENANTS[0]
    models = {"adapter": tenant.adapter, "base": BUILTIN_MODEL_NAME}
    results: dict[str, dict[str, list[dict]]] = {}
    for i, system in enumerate(args.systems.split(",")):
        port = 8100 + i
        log = Path(tempfile.gettempdir()) / f"serving_compare_{system}.log"
        proc = start(system, port, log)
        port = client_port(system, port)
        try:
            ready_s = wait_ready(port, tenant.api_key, tenant.adapter)
            print(f"{system}: ready after {ready_s:.1f}s (log {log})", flush=True)
            for model_kind in args.models.split(","):
                for rate in args.rates.split(","):
                    scenario = f"{model_kind} rate={rate}"
                    runs = results.setdefault(scenario, {}).setdefault(system, [])
                    for seed in range(args.runs):
                        runs.append(bench(port, models[model_kind], rate, seed, tenant.api_key))
                        print(f"  {scenario} run {seed}: {runs[-1]}", flush=True)
        finally:
            stop(proc)
    args.out.write_text(json.dumps(results, indent=1))
    print_tables(results)


def print_tables(results: dict[str, dict[str, list[dict]]]) -> None:
    for scenario, by_system in results.items():
        print(f"\n### {scenario} (median of {len(next(iter(by_system.values())))} runs)")
        print("| system | " + " | ".join(METRICS) + " | failed |")
        print("|---" * (len(METRICS) + 2) + "|")
        medians = {
            s: {m: statistics.median(r[m] for r in runs) for m in (*METRICS, "failed")}
            for s, runs in by_system.items()
        }
        for system, med in medians.items():
            cells = " | ".join(f"{med[m]:.1f}" for m in METRICS)
            print(f"| {system} | {cells} | {med['failed']:.0f} |")
        if "vllm" in medians:
            for system, med in medians.items():
                if system == "vllm":
                    continue
                ratios = " | ".join(
                    f"{med[m] / medians['vllm'][m]:.2f}" if medians["vllm"][m] else "-"
                    for m in METRICS
                )
                print(f"| {system} / vllm | {ratios} | |")


if __name__ == "__main__":
    main()
