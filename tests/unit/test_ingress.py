"""The ingress's FastAPI app on its own (no Ray): errors in the OpenAI shape, request ids, the
access log. The engine is a test double here because the faults injected (an exception nobody
expected, an engine dying mid-stream) cannot be caused on demand in the real app; the real path
is covered by tests/integration/test_server.py."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.builtin_model import DEMO_TENANTS
from app.config import AppConfig
from app.contract import Accepted, ReplyHead, ReplyKind, ReplyTail
from app.ingress import build_api
from app.registry import Registry, Snapshot
from app.request_policy import RequestLimits
from app.tenancy import Tenancy, hash_api_key
from tests.unit.scripted_replies import HANG, ScriptedReplies

ACCESS_LOGGER = "ray.serve.moelora.access"
ACME = DEMO_TENANTS[0]
AUTH = {"Authorization": f"Bearer {ACME.api_key}"}
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@contextlib.contextmanager
def access_log_captured(caplog):
    """caplog's handler on the access logger itself, and only there: whether `ray.serve.*`
    records reach the root logger (where caplog listens by default) depends on what Ray has
    configured earlier in the process, so each line must be captured exactly once either way."""
    logger = logging.getLogger(ACCESS_LOGGER)
    propagate = logger.propagate
    logger.addHandler(caplog.handler)
    logger.propagate = False
    try:
        with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
            yield
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate


class ScriptedEngine:
    def __init__(self, items, call_raises: Exception | None = None):
        self.items = items
        self.call_raises = call_raises
        self.calls = []
        self.requests = []
        self.replies: list[ScriptedReplies] = []

    def call(self, endpoint, request, context):
        if self.call_raises is not None:
            raise self.call_raises
        adapter = context.adapter.engine_name if context.adapter else None
        self.calls.append((endpoint, request.model, adapter))
        self.requests.append(request)
        self.replies.append(ScriptedReplies(self.items))
        return self.replies[-1]


@dataclass
class StaticView:
    snapshot: Snapshot


def make_client(
    items, readiness=None, call_raises=None, limits=None
) -> tuple[TestClient, ScriptedEngine]:
    cfg = AppConfig.from_args(
        {
            "tenants": [{"name": ACME.name, "api_key_sha256": [hash_api_key(ACME.api_key)]}],
            "adapters": [{"name": ACME.adapter, "path": "/unused", "owner": ACME.name}],
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(Path(tmp) / "registry.sqlite")
        registry.seed(cfg.tenants, cfg.adapters, lambda a: ("", 0, 0))
        snapshot = registry.snapshot()
    engine = ScriptedEngine(items, call_raises)
    tenancy = Tenancy(StaticView(snapshot), "base")
    api = build_api(engine, tenancy, 2, limits=limits, readiness=readiness)
    return TestClient(api, raise_server_exceptions=False), engine


def assert_openai_error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


def test_an_unexpected_exception_is_an_openai_500_naming_the_request_id():
    client, _ = make_client([], call_raises=RuntimeError("boom: secret internals"))
    resp = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    err = assert_openai_error(resp, 500)
    request_id = resp.headers["x-request-id"]
    assert request_id in err["message"] and "secret internals" not in err["message"]


def test_fastapi_own_errors_are_openai_shaped():
    client, _ = make_client([])
    assert_openai_error(client.get("/v1/nothing-here", headers=AUTH), 404)
    assert_openai_error(client.get("/v1/chat/completions", headers=AUTH), 405)


def test_request_id_is_generated_when_none_comes_in():
    client, _ = make_client([])
    first, second = (client.get("/health").headers["x-request-id"] for _ in range(2))
    assert first != second and len(first) == 32


@pytest.mark.parametrize(
    ("sent", "kept"), [("req-42.a:b", True), ("x" * 129, False), ("a b", False)]
)
def test_only_a_well_formed_incoming_request_id_is_used(sent, kept):
    client, _ = make_client([], call_raises=RuntimeError("boom"))
    resp = client.post("/v1/chat/completions", json=CHAT, headers={**AUTH, "x-request-id": sent})
    assert (sent in resp.json()["error"]["message"]) is kept


def test_json_reply_passes_through_and_is_logged_once_without_secrets(caplog):
    body = b'{"id": "x", "object": "chat.completion", "choices": []}'
    client, engine = make_client(
        [Accepted("r1"), ReplyHead(ReplyKind.JSON, body=body, prompt_tokens=5, completion_tokens=2)]
    )
    secret_prompt = {
        **CHAT,
        "model": ACME.adapter,
        "messages": [{"role": "user", "content": "PII"}],
    }
    with access_log_captured(caplog):
        resp = client.post("/v1/chat/completions", json=secret_prompt, headers=AUTH)
    assert resp.status_code == 200 and resp.content == body
    assert resp.headers["x-served-by"] == "r1"
    assert engine.calls == [("chat", ACME.adapter, f"{ACME.name}/{ACME.adapter}/v1")]
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["tenant"] == ACME.name and record["model"] == ACME.adapter
    assert (record["status"], record["replica"]) == (200, "r1")
    assert (record["prompt_tokens"], record["completion_tokens"]) == (5, 2)
    assert record["request_id"] == resp.headers["x-request-id"]
    assert "PII" not in lines[0] and ACME.api_key not in lines[0]


def test_stream_token_counts_reach_the_log_and_an_engine_failure_ends_with_an_error_event(caplog):
    head = [Accepted("r1"), ReplyHead(ReplyKind.STREAM)]
    client, _ = make_client([*head, "data: {}\n\n", ReplyTail(3, 1), "data: [DONE]\n\n"])
    with access_log_captured(caplog):
        resp = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    assert resp.text == "data: {}\n\ndata: [DONE]\n\n"
    record = json.loads([r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER][0])
    assert (record["stream"], record["completion_tokens"]) == (True, 1)

    client, _ = make_client([*head, "data: {}\n\n", ConnectionError("replica died")])
    resp = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    events = [e for e in resp.text.split("\n\n") if e]
    assert events[0] == "data: {}" and events[-1] == "data: [DONE]"
    assert json.loads(events[1].removeprefix("data: "))["error"]["code"] == 503


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 5000 + "]" * 5000,  # nested deeper than the parser's recursion limit
        '{"model": "base", "messages": "x"',  # truncated
        b"\xff\xfe not utf-8",
    ],
    ids=["deep-nesting", "truncated", "not-utf8"],
)
def test_unparseable_bodies_are_400(raw):
    client, engine = make_client([])
    resp = client.post("/v1/chat/completions", content=raw, headers=AUTH)
    assert_openai_error(resp, 400)
    assert engine.calls == []


@pytest.mark.parametrize("model", ["\ud800", "m" * 100_000])
def test_unknown_model_names_are_echoed_safely(model):
    client, _ = make_client([])
    raw = json.dumps({**CHAT, "model": model})  # ensure_ascii: the surrogate travels as \\ud800
    err = assert_openai_error(client.post("/v1/chat/completions", content=raw, headers=AUTH), 404)
    assert len(err["message"]) < 200 and err["param"] == "model"


def test_the_server_sets_the_prefix_cache_salt_per_tenant():
    client, engine = make_client([Accepted("r1"), ReplyHead(ReplyKind.JSON, body=b"{}")])
    client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    client.post("/v1/chat/completions", json={**CHAT, "cache_salt": "other:"}, headers=AUTH)
    first, second = (r.cache_salt for r in engine.requests)
    assert first.startswith(f"{ACME.name}:") and second.startswith(f"{ACME.name}:")
    assert first != second  # the client's salt narrows within the tenant, nothing more


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"priority": -10}, "priority"), ({"vllm_xargs": {}}, "vllm_xargs"), ({"n": 99}, "n")],
)
def test_fields_only_the_server_may_set_and_limits_are_refused_by_name(extra, param):
    client, engine = make_client([])
    resp = client.post("/v1/chat/completions", json={**CHAT, **extra}, headers=AUTH)
    assert assert_openai_error(resp, 400)["param"] == param
    assert engine.requests == []


def test_readiness_is_503_with_retry_after_until_an_engine_runs():
    async def not_ready():
        return False, {"Engine": {"status": "UPDATING", "replicas": {"STARTING": 1}}}

    client, _ = make_client([], readiness=not_ready)
    resp = client.get("/ready")
    assert resp.status_code == 503 and resp.headers["retry-after"] == "2"
    assert resp.json()["deployments"]["Engine"]["status"] == "UPDATING"
    assert client.get("/health").status_code == 200  # alive all the same


def test_no_replica_taking_the_request_is_a_503_within_the_bound():
    client, engine = make_client([HANG], limits=RequestLimits(accept_timeout_s=0.3))
    t0 = time.monotonic()
    resp = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert assert_openai_error(resp, 503) and int(resp.headers["retry-after"]) >= 1
    assert time.monotonic() - t0 < 3 and engine.replies[0].cancelled


def test_an_engine_failing_before_it_answers_is_a_503_to_retry():
    client, engine = make_client([Accepted("r1"), ConnectionError("actor died")])
    resp = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert_openai_error(resp, 503)
    assert resp.headers["retry-after"] == "2" and engine.replies[0].cancelled


def test_lazily_validated_iterables_are_materialized_so_they_can_cross_the_ray_hop():
    import pickle
    from collections.abc import Iterable

    from pydantic import TypeAdapter, ValidationError

    from app.ingress import materialized

    lazy = TypeAdapter(Iterable[int]).validate_python([1, "2"])
    with pytest.raises(TypeError):
        pickle.dumps(lazy)
    value = materialized([{"role": "assistant", "content": lazy}])
    assert pickle.loads(pickle.dumps(value)) == [{"role": "assistant", "content": [1, 2]}]
    with pytest.raises(ValidationError):  # a bad item surfaces here, as a 400
        materialized(TypeAdapter(Iterable[int]).validate_python(["x"]))
