"""colocate_engine_core on real processes: a parent (the engine replica's place) starts a child
titled as vLLM titles its EngineCore, which starts a child titled as its worker; the worker pins
itself (as vLLM's CPU backend does) or not (as on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from app.replica_env import colocate_engine_core

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to tell cores apart"
)

# The EngineCore stand-in: vLLM's process title, a second thread, a worker child.
ENGINE_CORE = textwrap.dedent(
    """
    import os, subprocess, sys, threading, time
    import setproctitle
    setproctitle.setproctitle(sys.argv[1])
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[3]])
    print("up", flush=True)
    time.sleep(60)
    """
)
WORKER = textwrap.dedent(
    """
    import os, sys, time
    import setproctitle
    setproctitle.setproctitle("VLLM::Worker")
    if sys.argv[1] != "all":
        os.sched_setaffinity(0, {int(sys.argv[1])})
    time.sleep(60)
    """
)


@pytest.fixture
def engine_core():
    """(title, worker's core or "all") -> the EngineCore stand-in's psutil.Process, its worker
    started and pinned."""
    started = []

    def start(title: str, worker_core: str) -> psutil.Process:
        proc = subprocess.Popen(
            [sys.executable, "-c", ENGINE_CORE, title, WORKER, worker_core],
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout.readline().strip() == "up"
        core = psutil.Process(proc.pid)
        pinned = None if worker_core == "all" else [int(worker_core)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the worker titled and pinned itself
            workers = [w for w in core.children() if "Worker" in w.name()]
            if workers and (pinned is None or workers[0].cpu_affinity() == pinned):
                return core
            time.sleep(0.05)
        raise TimeoutError("the worker stand-in did not start")

    yield start
    for proc in started:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()


def thread_affinities(process: psutil.Process) -> list[set[int]]:
    return [os.sched_getaffinity(t.id) for t in process.threads()]


def test_engine_core_moves_to_its_pinned_workers_core(engine_core):
    last = max(os.sched_getaffinity(0))
    core = engine_core("VLLM::EngineCore", str(last))
    assert all(len(a) > 1 for a in thread_affinities(core))  # spread before

    moved = colocate_engine_core(psutil.Process())

    assert moved == [core.pid]
    affinities = thread_affinities(core)
    assert len(affinities) >= 2  # the main thread and the extra one, each moved
    assert all(a == {last} for a in affinities)


def test_engine_core_of_unpinned_workers_stays(engine_core):
    """A GPU engine's workers are not pinned: nothing to follow, nothing moved."""
    core = engine_core("VLLM::EngineCore", "all")
    before = thread_affinities(core)

    assert colocate_engine_core(psutil.Process()) == []
    assert thread_affinities(core) == before


def test_other_children_stay(engine_core):
    """Only vLLM's EngineCore is moved, not another child that happens to have a pinned child."""
    other = engine_core("some-helper", "0")
    before = thread_affinities(other)

    assert colocate_engine_core(psutil.Process()) == []
    assert thread_affinities(other) == before
