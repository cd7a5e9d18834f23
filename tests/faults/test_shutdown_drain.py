"""Graceful shutdown drains streams in flight: deleting the application (what `serve shutdown`
and Ctrl-C of `serve run` do) stops every replica, and each first finishes what it has
(`deployment.graceful_shutdown_timeout_s` for the engines, Ray's default for the ingress).

Deletes the package's app, so this module runs last in tests/faults (file order)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.integration.app_under_test import BASE_URL, KEYS, OWN_ADAPTER, chat_body

pytestmark = pytest.mark.engine

TOKENS = 200
# Two tenants' adapters: they fit the replicas' LoRA slots (max_loras 2) even on one replica,
# so both streams run side by side and are both still running when the delete begins.
TENANTS = ("acme", "globex")


class Stream(threading.Thread):
    """One streaming chat completion, read to its end; what it received."""

    def __init__(self, tenant: str):
        super().__init__(daemon=True)
        self.tenant = tenant
        self.first_token = threading.Event()
        self.lines: list[str] = []
        self.error: Exception | None = None
        self.served_by = ""
        self.ended_at = 0.0

    def run(self) -> None:
        body = chat_body(
            model=OWN_ADAPTER[self.tenant],
            stream=True,
            max_tokens=TOKENS,
            ignore_eos=True,
            stream_options={"include_usage": True},
        )
        try:
            with httpx.stream(
                "POST",
                f"{BASE_URL}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {KEYS[self.tenant]}"},
                timeout=120,
            ) as resp:
                self.served_by = resp.headers.get("x-served-by", "")
                for line in resp.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.first_token.set()
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.first_token.set()

    def completion_tokens(self) -> int | None:
        for line in reversed(self.lines):
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    return usage["completion_tokens"]
        return None


def test_deleting_the_app_lets_every_stream_in_flight_finish(server):
    from ray import serve

    streams = [Stream(tenant) for tenant in TENANTS]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first_token.wait(60), "a stream never started"
    assert all(s.error is None for s in streams), [s.error for s in streams]
    replicas = {s.served_by for s in streams}

    t0 = time.monotonic()
    serve.delete("moelora")  # blocks until every replica has stopped
    deleted_after_s = time.monotonic() - t0
    for s in streams:
        s.join(60)

    for s in streams:
        assert s.error is None, (s.tenant, s.error)
        assert s.lines[-1] == "data: [DONE]", (s.tenant, s.lines[-3:])
        assert not any('"error"' in line for line in s.lines), (s.tenant, s.lines[-3:])
        assert s.completion_tokens() == TOKENS, (s.tenant, s.lines[-3:])
    # Every stream was still running when the delete began: the stop waited for it.
    assert min(s.ended_at for s in streams) > t0
    print(f"streams on {len(replicas)} replica(s) drained; delete took {deleted_after_s:.1f}s")
