"""A catalogue of hostile and malformed requests against the real app, each with the status it
must get, always in the OpenAI error shape, never a 5xx; the replicas keep serving throughout."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.integration.app_under_test import (
    BASE,
    BASE_URL,
    KEYS,
    MAX_MODEL_LEN,
    MESSAGES,
    OWN_ADAPTER,
    PORT,
    assert_openai_error,
    chat_body,
    post,
)

pytestmark = pytest.mark.engine

ACME = f"Bearer {KEYS['acme']}"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
JSON = {"Content-Type": "application/json"}


def case(id, status, body=None, path=CHAT, method="POST", headers=None, auth=ACME, raw=None):  # noqa: A002
    return pytest.param(method, path, headers, auth, raw, body, status, id=id)


def deep(n: int) -> str:
    return "[" * n + "]" * n


CATALOG = [
    # --- identity -------------------------------------------------------------------------
    case("no-auth", 401, chat_body(), auth=None),
    case("scheme-only", 401, chat_body(), auth="Bearer"),
    case("key-with-spaces", 401, chat_body(), auth=f"Bearer {KEYS['acme']} extra"),
    case("basic-scheme", 401, chat_body(), auth=f"Basic {KEYS['acme']}"),
    case("no-scheme", 401, chat_body(), auth=KEYS["acme"]),
    case("wrong-key", 401, chat_body(), auth="Bearer sk-nope"),
    case("key-8kb", 401, chat_body(), auth="Bearer " + "k" * 8192),
    case("key-of-other-case", 401, chat_body(), auth=f"Bearer {KEYS['acme'].upper()}"),
    case("models-no-auth", 401, path="/v1/models", method="GET", auth=None),
    # --- body: not a request --------------------------------------------------------------
    case("empty-body", 400, raw=b""),
    case("not-json", 400, raw=b"{not json"),
    case("json-array", 400, raw=b"[1, 2]"),
    case("json-string", 400, raw=b'"hello"'),
    case("json-null", 400, raw=b"null"),
    case("truncated-json", 400, raw=b'{"model": "x", "messages": ['),
    case("nested-5000", 400, raw=deep(5000).encode()),
    case("nested-in-field-5000", 400, raw=b'{"model": ' + deep(5000).encode() + b"}"),
    case("invalid-utf8", 400, raw=b'{"model": "\xff\xfe"}'),
    case("body-over-1mb", 413, raw=b" " * 1_100_000),
    # --- body: wrong shapes ---------------------------------------------------------------
    case("no-messages", 400, {"model": BASE}),
    case("empty-messages", 400, chat_body(messages=[])),
    case("messages-string", 400, chat_body(messages="hello")),
    case("message-no-role", 400, chat_body(messages=[{"content": "hi"}])),
    case("model-int", 400, chat_body(model=42)),
    case("model-null", 400, chat_body(model=None)),
    case("model-missing", 400, {"messages": MESSAGES}),
    case("max-tokens-str", 400, chat_body(max_tokens="ten")),
    case("max-tokens-float", 400, chat_body(max_tokens=1.5)),
    case("max-tokens-0", 400, chat_body(max_tokens=0)),
    case("max-tokens-neg", 400, chat_body(max_tokens=-5)),
    case("max-tokens-over-context", 400, chat_body(max_tokens=MAX_MODEL_LEN * 4)),
    case(
        "prompt-over-context", 400, chat_body(messages=[{"role": "user", "content": "x " * 4000}])
    ),
    case("temperature-neg", 400, chat_body(temperature=-1.0)),
    case("temperature-str", 400, chat_body(temperature="hot")),
    case("top-p-1.5", 400, chat_body(top_p=1.5)),
    case("n-0", 400, chat_body(n=0)),
    case("n-1000", 400, chat_body(n=1000)),
    case("stop-1000", 400, chat_body(stop=["x"] * 1000)),
    case("stop-token-ids-1000", 400, chat_body(stop_token_ids=list(range(1000)))),
    case("logit-bias-10000", 400, chat_body(logit_bias={str(i): 1.0 for i in range(10000)})),
    case("top-logprobs-1000", 400, chat_body(logprobs=True, top_logprobs=1000)),
    case("stream-options-without-stream", 400, chat_body(stream_options={"include_usage": True})),
    case("cache-salt-empty", 400, chat_body(cache_salt="")),
    # --- body: fields only the server may set ---------------------------------------------
    case("priority", 400, chat_body(priority=-100)),
    case("request-id", 400, chat_body(request_id="r" * 10_000)),
    case("kv-transfer-params", 400, chat_body(kv_transfer_params={"do_remote_decode": True})),
    case("vllm-xargs", 400, chat_body(vllm_xargs={"session_id": "x"})),
    case("chat-template", 400, chat_body(chat_template="{{ messages }}")),
    case("chat-template-kwargs", 400, chat_body(chat_template_kwargs={"x": 1})),
    case("beam-search", 400, chat_body(use_beam_search=True)),
    case("unknown-field", 400, chat_body(frobnicate=True)),
    case("unknown-field-100kb-name", 400, chat_body(**{"f" * 100_000: 1})),
    # --- models ---------------------------------------------------------------------------
    case("unknown-model", 404, chat_body(model="nosuch")),
    case("foreign-adapter", 404, chat_body(model=OWN_ADAPTER["globex"])),
    case("model-100kb", 404, chat_body(model="m" * 100_000)),
    case("model-lone-surrogate", 404, raw=json.dumps(chat_body(model="\ud800")).encode()),
    case("model-with-newline", 404, chat_body(model="acme-support\nX-Injected: 1")),
    # --- completions ----------------------------------------------------------------------
    case("completion-empty-prompt", 400, {"model": BASE, "prompt": ""}, path=COMPLETIONS),
    case("completion-no-prompt", 400, {"model": BASE}, path=COMPLETIONS),
    case("completion-bad-token-id", 400, {"model": BASE, "prompt": [10**9]}, path=COMPLETIONS),
    case("completion-priority", 400, {"model": BASE, "prompt": "a", "priority": 1}, COMPLETIONS),
    # --- routes and methods ---------------------------------------------------------------
    case("unknown-route", 404, path="/v1/nothing", method="GET"),
    case("openapi-hidden", 404, path="/openapi.json", method="GET"),
    case("get-on-chat", 405, path=CHAT, method="GET"),
    case("delete-models", 405, path="/v1/models", method="DELETE"),
    case("post-models", 405, {}, path="/v1/models"),
]


@pytest.mark.parametrize(("method", "path", "headers", "auth", "raw", "body", "status"), CATALOG)
def test_hostile_request(server, method, path, headers, auth, raw, body, status):
    sent = {**JSON, **(headers or {}), **({"Authorization": auth} if auth else {})}
    content = raw if raw is not None else (json.dumps(body) if body is not None else None)
    resp = httpx.request(method, f"{BASE_URL}{path}", content=content, headers=sent, timeout=60)
    err = assert_openai_error(resp, status)
    assert len(resp.content) < 4096, "errors never echo a whole request back"
    if status == 400 and body is not None and "f" * 64 in json.dumps(body):
        assert err["param"] is None or len(err["param"]) <= 70


def test_two_authorization_headers_are_refused(server):
    headers = [("Authorization", ACME), ("Authorization", "Bearer sk-nope"), *JSON.items()]
    resp = httpx.post(f"{BASE_URL}{CHAT}", content=json.dumps(chat_body()), headers=headers)
    assert_openai_error(resp, 401)


def test_a_body_shorter_than_its_content_length_is_dropped_in_seconds(server):
    """A client announcing more than it sends must not hold a connection (was >= 360 s)."""
    with socket.create_connection(("127.0.0.1", PORT), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: {ACME}\r\nContent-Type: application/json\r\n".encode()
            + b"Content-Length: 1000\r\n\r\n"
            + b'{"model": "'
        )
        t0 = time.monotonic()
        reply = sock.recv(4096)
        waited = time.monotonic() - t0
    assert b" 408 " in reply.split(b"\r\n")[0], reply[:200]
    assert waited < 15


def test_a_client_vanishing_mid_stream_costs_nobody_else(server):
    body = chat_body(model=OWN_ADAPTER["acme"], stream=True, max_tokens=200, ignore_eos=True)
    for _ in range(3):
        headers = {"Authorization": ACME}
        with httpx.stream(
            "POST", f"{BASE_URL}{CHAT}", json=body, headers=headers, timeout=60
        ) as resp:
            assert resp.status_code == 200
            next(resp.iter_lines())  # one event, then hang up
    assert post(CHAT, chat_body(messages=MESSAGES)).status_code == 200


def test_the_server_keeps_serving_after_the_catalogue(server):
    resp = post(CHAT, chat_body(model=OWN_ADAPTER["acme"]))
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(f"{BASE_URL}/health").status_code == 200
