"""The utilization autoscaling policy (app/autoscaling.py) scaling a real engine deployment.

A fresh local Ray node runs the app with the engine deployment autoscaled between 1 and 2 CPU
replicas (a small per-replica target so that a 2-core machine can load one replica past it).
Sustained streaming load from the official `openai` client must raise the count to 2; then, with
only a trickle of long requests left, the count must come back to 1 while those requests are in
flight: Serve drains the replica it stops, so every request, before, during and after both
changes, is answered completely. The policy's decisions must be in the Serve controller's log
with the inputs that led to them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import openai
import pytest

from tests.integration.app_under_test import BASE, KEYS, MESSAGES, app_args, running_app

PORT = 8783
METRICS_PORT = 8784
APP = "moelora"
ENGINE = "Engine"
MAX_TOKENS = 48


def engine_replicas() -> tuple[int, int]:
    """(running, all: starting, running, stopping...) replicas of the engine deployment, from
    Serve's own status."""
    from ray import serve

    states = serve.status().applications[APP].deployments[ENGINE].replica_states
    return states.get("RUNNING", 0), sum(states.values())


class Load:
    """`streams` threads, each sending streaming chats one after another until stopped;
    every request's outcome is kept."""

    def __init__(self, base_url: str, streams: int, max_tokens: int = MAX_TOKENS):
        self.stop = threading.Event()
        self.outcomes: list[tuple[str, int]] = []  # ("ok"/error text, completion tokens)
        self._lock = threading.Lock()
        tenants = list(KEYS)
        self.threads = [
            threading.Thread(
                target=self._loop,
                args=(base_url, tenants[i % len(tenants)], max_tokens),
                daemon=True,
            )
            for i in range(streams)
        ]
        for t in self.threads:
            t.start()

    def _loop(self, base_url: str, tenant: str, max_tokens: int) -> None:
        client = openai.OpenAI(
            base_url=f"{base_url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=300
        )
        while not self.stop.is_set():
            try:
                stream = client.chat.completions.create(
                    model=BASE, messages=MESSAGES, max_tokens=max_tokens, stream=True,
                    extra_body={"ignore_eos": True},
                    stream_options={"include_usage": True},
                )  # fmt: skip
                tokens = 0
                for chunk in stream:
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                outcome = ("ok", tokens)
            except Exception as exc:  # every failure is a finding: kept and asserted on
                outcome = (f"{type(exc).__name__}: {exc}", 0)
            with self._lock:
                self.outcomes.append(outcome)

    def finish(self) -> list[tuple[str, int]]:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)
        return self.outcomes


def wait_for(predicate, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(1.0)
    held = controller_log_lines("autoscaling Engine:")[-5:]
    raise AssertionError(
        f"not within {timeout_s:.0f}s: {what} (replicas {engine_replicas()}); last decisions:\n"
        + "\n".join(held)
    )


def controller_log_lines(needle: str) -> list[str]:
    import ray

    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    lines = []
    for log in (session / "logs" / "serve").glob("controller_*.log"):
        lines += [line for line in log.read_text(errors="replace").splitlines() if needle in line]
    return lines


@pytest.fixture(scope="module")
def autoscaled(builtin):
    args = app_args()
    args["deployment"].pop("num_replicas")
    args["deployment"].update(
        max_ongoing_requests=32,
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": 2,
            "initial_replicas": 1,
            "upscale_delay_s": 3,
            "downscale_delay_s": 10,
            "metrics_interval_s": 1,
            "look_back_period_s": 3,
            "policy": {
                "policy_function": "app.autoscaling:UtilizationPolicy",
                # 8 concurrent streams: load up to 4, wants 2 (the max); one stream: load
                # 0.5, below the 0.8 headroom of one replica: back to 1.
                "policy_kwargs": {"target_requests_per_replica": 2, "log_every_s": 5},
            },
        },
    )
    with running_app(args, port=PORT, metrics_port=METRICS_PORT) as url:
        yield url


def test_load_scales_the_engines_up_and_quiet_scales_them_down_dropping_nothing(autoscaled):
    assert engine_replicas() == (1, 1)

    heavy = Load(autoscaled, streams=8)
    try:
        took_up = wait_for(lambda: engine_replicas() == (2, 2), 240, "scale up to 2 replicas")
    finally:
        heavy_outcomes = heavy.finish()

    # Quiet, but not idle: a long request stays in flight while a replica is stopped.
    trickle = Load(autoscaled, streams=1, max_tokens=128)
    try:
        took_down = wait_for(lambda: engine_replicas() == (1, 1), 180, "scale down to 1 replica")
        time.sleep(3.0)  # requests that were on the stopped replica have ended by now
    finally:
        trickle_outcomes = trickle.finish()

    for outcomes, want in ((heavy_outcomes, MAX_TOKENS), (trickle_outcomes, 128)):
        failed = [o for o in outcomes if o != ("ok", want)]
        assert outcomes and not failed, failed[:5]
    print(
        f"scaled up in {took_up:.0f}s ({len(heavy_outcomes)} requests), down in "
        f"{took_down:.0f}s ({len(trickle_outcomes)} requests), all answered in full"
    )

    up = controller_log_lines(f"autoscaling {ENGINE}: want 2 replicas (now 1)")
    down = controller_log_lines(f"autoscaling {ENGINE}: want 1 replicas (now 2)")
    assert up and down, "decisions missing from the controller log"
    assert "load" in up[0] and "running" in up[0] and "waiting" in up[0]
