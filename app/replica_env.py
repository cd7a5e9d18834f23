"""How our replicas run on a node: the process settings both deployments share.

Why these exist (measured on the 2-core CPU machine, docs/serving.md):
  * Ray starts worker processes at nice 15, below the client, the proxy and Ray's own daemons.
    vLLM's engine core and worker inherit it from the engine replica, so under load the engine
    that produces every token gets the CPU last. Replicas reset their niceness to 0 where the
    OS allows (as root, or with CAP_SYS_NICE); `RAY_worker_niceness=0` at `ray start` does the
    same for every worker.
  * Ray Serve runs user code on a second event loop in another thread by default, so every
    streamed item crosses threads. Our replicas only await (the ingress) or run vLLM's asyncio
    front end (the engine), so they run user code on Serve's own loop.
  * Likewise a handle's router (the ingress's calls to engines, Registry and Quotas) runs on
    a third loop in its own thread by default: every call hops there and back, and the two
    loops contend for the GIL. Ours runs on the replica's loop (Ray Serve's own
    RAY_SERVE_THROUGHPUT_OPTIMIZED preset does the same): nothing on it blocks. Stress
    benchmark, 128 streams: +9-17% token chunks/s, added TTFT p50 -20-40% (docs/serving.md).
  * On CPU, vLLM binds its worker (the model) to some cores and leaves the others to everything
    else, but not its EngineCore: that process spin-waits (sched_yield) on the worker's reply
    for a second after every step, so under load it takes most of a "free" core, and the
    replicas, the HTTP front and Ray's daemons queue behind it. EngineCore and worker take
    turns (one schedules while the other waits, and back), so the EngineCore is moved onto its
    workers' cores (`colocate_engine_core`): its spinning then only hands the core back to
    the worker, and the free cores are free. On the 2-core machine this took the light-load
    TTFT p90 from ~600 ms to ~60 ms (docs/serving.md).
"""

from __future__ import annotations

import os
from typing import Any

import psutil

from app.logs import get_logger

logger = get_logger("replica_env")

REPLICA_ENV_VARS = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def with_replica_env(actor_options: dict[str, Any], env_vars: dict[str, str]) -> dict[str, Any]:
    """Ray actor options with our replica env vars under any the config sets (config wins)."""
    options = dict(actor_options)
    runtime_env = dict(options.pop("runtime_env", {}) or {})
    runtime_env["env_vars"] = {**REPLICA_ENV_VARS, **env_vars, **runtime_env.get("env_vars", {})}
    options["runtime_env"] = runtime_env
    return options


def reset_niceness() -> None:
    """Run this process (every thread, and what it starts) at nice 0 if Ray started it lower.
    On Linux niceness is per thread, so each existing thread is reset."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current <= 0:
        return
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the process is the unit
        threads = [0]
    try:
        for tid in threads:
            os.setpriority(os.PRIO_PROCESS, tid, 0)
        logger.info("priority raised from nice %d to 0 (%d threads)", current, len(threads))
    except PermissionError:
        logger.info("running at nice %d (not allowed to change it)", current)
    except ProcessLookupError:  # a thread ended meanwhile
        pass


ENGINE_CORE_TITLE = "EngineCore"  # vLLM's process titles: VLLM::EngineCore, VLLM::Worker...
WORKER_TITLE = "Worker"


def colocate_engine_core(parent: psutil.Process | None = None) -> list[int]:
    """Run each vLLM EngineCore started by this process (`parent`) on the union of its workers'
    cores, when vLLM pinned its workers to fewer cores than the EngineCore may use (its CPU
    backend does; a GPU engine runs its model in the EngineCore or leaves workers unpinned, and
    is left alone). Every thread is moved (Linux affinity is per thread). Returns the EngineCores
    moved."""
    parent = parent or psutil.Process()
    moved = []
    for core in parent.children():
        try:
            if ENGINE_CORE_TITLE not in core.name():
                continue
            workers = [w for w in core.children() if WORKER_TITLE in w.name()]
            cores = set().union(*(w.cpu_affinity() for w in workers)) if workers else set()
            if not cores or cores >= set(core.cpu_affinity()):  # workers not pinned apart
                continue
            for thread in core.threads():
                os.sched_setaffinity(thread.id, cores)
            moved.append(core.pid)
            logger.info("EngineCore %d moved to its workers' cores %s", core.pid, sorted(cores))
        except (psutil.Error, ProcessLookupError, PermissionError) as exc:
            logger.info("EngineCore %s left where it is: %r", core.pid, exc)
    return moved
