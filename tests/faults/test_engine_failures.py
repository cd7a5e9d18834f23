"""Engines killed for real under load, two replicas, every request's outcome counted.

Eight clients stream chat completions without pause (base model and adapters); one engine
replica is then killed, either its Ray actor (SIGKILL: the process and its EngineCore vanish)
or only its vLLM EngineCore process (SIGKILL: the replica lives on with a dead engine, the case
where a broken replica answers fastest and would draw the traffic). Requirements (issue 9):
no request hangs or is cut without an answer; streams in flight end with an SSE error event
or complete (or, taken but not yet answered, get a 503); requests arriving after the failure
is detected (at most 3 s) all succeed; anything refused is a fast 503 with Retry-After.

Raw httpx streams here, not the openai client: the test must see each stream's last bytes (an
error event vs a cut connection).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import psutil
import pytest

from app.builtin_model import SHARED_DEMO_ADAPTER
from tests.integration.app_under_test import BASE, BASE_URL, KEYS, MESSAGES, OWN_ADAPTER

pytestmark = pytest.mark.engine

CLIENTS = 8
WARMUP_S = 4.0
AFTER_KILL_S = 15.0
DETECTION_BOUND_S = 3.0  # the target
HUNG_S = 20.0  # a request taking this long counts as hung
FAST_REFUSAL_S = 1.0


@dataclass(frozen=True)
class Outcome:
    start: float
    end: float
    kind: str  # ok | error_event | cut | hung | http_<status>
    served_by: str | None


def stream_once(rng: random.Random) -> Outcome:
    tenant = rng.choice(sorted(KEYS))
    model = rng.choice([BASE, OWN_ADAPTER[tenant], SHARED_DEMO_ADAPTER])
    body = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": 24,
        "stream": True,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
    start, served_by = time.monotonic(), None
    try:
        with httpx.stream(
            "POST", f"{BASE_URL}/v1/chat/completions", json=body, headers=headers, timeout=HUNG_S
        ) as resp:
            served_by = resp.headers.get("x-served-by")
            if resp.status_code != 200:
                resp.read()
                error = resp.json()["error"]  # OpenAI-shaped, or this raises
                assert error["code"] == resp.status_code
                if resp.status_code == 503:
                    assert int(resp.headers["retry-after"]) >= 1
                kind = f"http_{resp.status_code}"
            else:
                kind = "cut"  # unless [DONE] arrives
                for line in resp.iter_lines():
                    payload = line.removeprefix("data: ")
                    if payload == "[DONE]":
                        kind = "ok" if kind == "cut" else kind
                    elif payload.startswith("{") and "error" in json.loads(payload):
                        kind = "error_event"
    except httpx.TimeoutException:
        kind = "hung"
    except httpx.TransportError:
        kind = "cut"
    return Outcome(start, time.monotonic(), kind, served_by)


class Load:
    """CLIENTS threads streaming back to back until stopped."""

    def __init__(self):
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(random.Random(i),), daemon=True)
            for i in range(CLIENTS)
        ]

    def _client(self, rng: random.Random) -> None:
        while not self._stop.is_set():
            self.outcomes.append(stream_once(rng))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(HUNG_S + 5)


def engine_replicas() -> dict[str, int]:
    """Running engine replicas: replica id -> pid of its actor process."""
    import ray

    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        app_deployment, _, replica_id = actor["name"].rpartition("#")
        if not app_deployment.endswith("#Engine"):
            continue
        try:
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            pids[replica_id] = ray.get(handle.__ray_call__.remote(lambda _: os.getpid()), timeout=5)
        except Exception:  # noqa: BLE001 - a replica going away meanwhile is not running
            continue
    return pids


def wait_for_engines(count: int, timeout_s: float = 240.0) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        engine = serve.status().applications["moelora"].deployments["Engine"]
        states = {str(getattr(k, "value", k)): v for k, v in engine.replica_states.items()}
        if states == {"RUNNING": count} and len(engine_replicas()) == count:
            return
        time.sleep(1)
    raise AssertionError(f"engine replicas not back to {count} RUNNING: {states}")


def kill_actor(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def kill_engine_core(pid: int) -> None:
    cores = [
        p
        for p in psutil.Process(pid).children(recursive=True)
        if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())
    ]
    assert len(cores) == 1, cores
    cores[0].kill()


def run_failure(kill) -> tuple[str, float, list[Outcome]]:
    wait_for_engines(2)
    with Load() as load:
        time.sleep(WARMUP_S)
        victim, pid = sorted(engine_replicas().items())[0]
        killed_at = time.monotonic()
        kill(pid)
        time.sleep(AFTER_KILL_S)
    return victim, killed_at, load.outcomes


def summarize(name: str, victim: str, killed_at: float, outcomes: list[Outcome]) -> dict:
    in_flight = [o for o in outcomes if o.start < killed_at <= o.end]
    after = [o for o in outcomes if o.start >= killed_at]
    failed_after = [o for o in after if o.kind != "ok"]
    detection_s = max((o.start - killed_at for o in failed_after), default=0.0)
    # The last request the dead replica was still given (it refuses or dies at once).
    to_victim = [o.start - killed_at for o in after if o.served_by == victim]
    report = {
        "failure": name,
        "requests": len(outcomes),
        "in_flight_at_kill": dict(Counter(o.kind for o in in_flight)),
        "after_kill": dict(Counter(o.kind for o in after)),
        "after_detection_failed": sum(
            o.kind != "ok" for o in after if o.start >= killed_at + DETECTION_BOUND_S
        ),
        "detection_s": round(detection_s, 2),
        "last_sent_to_victim_s": round(max(to_victim, default=0.0), 2),
        "slowest_refusal_s": round(
            max((o.end - o.start for o in after if o.kind.startswith("http_")), default=0.0), 2
        ),
        "max_latency_s": round(max(o.end - o.start for o in outcomes), 2),
    }
    print(f"\n{json.dumps(report)}")
    return report


def check(report: dict, outcomes: list[Outcome], killed_at: float) -> None:
    kinds = Counter(o.kind for o in outcomes)
    assert kinds["hung"] == 0 and kinds["cut"] == 0, report
    # In flight at the kill: completed elsewhere, ended by an SSE error event, or, if the
    # replica had taken it but not answered yet, a 503 (never retried once taken).
    assert set(report["in_flight_at_kill"]) <= {"ok", "error_event", "http_503"}, report
    assert report["after_detection_failed"] == 0, report
    assert report["detection_s"] <= DETECTION_BOUND_S, report
    # Whatever is refused is refused fast, with a 503 (checked in stream_once). A request the
    # victim took in the instant before vLLM noticed its EngineCore was gone (seen: 2 of 106,
    # 0.28 s after the kill) ends like the ones in flight, with an error event: taken requests
    # are never retried. After detection nothing fails (asserted above).
    assert set(report["after_kill"]) <= {"ok", "http_503", "error_event"}, report
    assert report["slowest_refusal_s"] <= FAST_REFUSAL_S, report
    # Enough traffic after the kill that the checks above mean something.
    assert report["after_kill"].get("ok", 0) >= 20, report
    assert report["in_flight_at_kill"], report


@pytest.mark.parametrize(
    "name,kill", [("actor", kill_actor), ("engine_core", kill_engine_core)], ids=str
)
def test_engine_killed_under_load(server, name, kill):
    victim, killed_at, outcomes = run_failure(kill)
    check(summarize(name, victim, killed_at, outcomes), outcomes, killed_at)
