"""The real application (Ray Serve + 2 vLLM CPU engine replicas + our plugin), over HTTP, with the
official `openai` client and httpx. Started once for the package (conftest.py).

Engines run fp32 and greedy so that a request's tokens do not depend on what it is batched with:
"each tenant gets its own adapter" is checked as "concurrent output == output alone", after
checking that the adapters' outputs all differ (so a swap could not go unnoticed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from app.builtin_model import SHARED_DEMO_ADAPTER
from tests.integration.app_under_test import (
    BASE,
    BASE_URL,
    KEYS,
    MAX_MODEL_LEN,
    MESSAGES,
    OWN_ADAPTER,
    assert_openai_error,
    chat_body,
    client,
    post,
)

pytestmark = pytest.mark.engine


def chat_text(tenant: str, model: str, max_tokens: int = 16) -> str:
    out = client(tenant).chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return out.choices[0].message.content


# ---- the API ---------------------------------------------------------------------------------


def test_models_lists_base_own_and_shared_adapters_only(server):
    models = {m.id: m for m in client("acme").models.list().data}
    assert set(models) == {BASE, OWN_ADAPTER["acme"], SHARED_DEMO_ADAPTER}
    assert models[OWN_ADAPTER["acme"]].parent == BASE


def test_chat_non_streaming_reports_usage(server):
    out = client("acme").chat.completions.create(
        model=OWN_ADAPTER["acme"],
        messages=MESSAGES,
        max_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.object == "chat.completion" and out.model == OWN_ADAPTER["acme"]
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.content
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7


def test_streaming_gives_the_same_text_as_non_streaming(server):
    stream = client("globex").chat.completions.create(
        model="globex-legal",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_text("globex", "globex-legal", max_tokens=12)
    assert chunks[-1].usage.completion_tokens == 12


def test_completions_endpoint(server):
    out = client("initech").completions.create(
        model="initech-code", prompt="The router sends", max_tokens=5, temperature=0
    )
    assert out.object == "text_completion" and out.usage.completion_tokens <= 5
    assert out.choices[0].text


def test_tenants_concurrently_each_get_their_own_adapter(server):
    jobs = [(t, OWN_ADAPTER[t]) for t in KEYS] + [("acme", BASE), ("globex", SHARED_DEMO_ADAPTER)]
    alone = {job: chat_text(*job, max_tokens=24) for job in jobs}
    distinct = [text for (_, model), text in alone.items() if model != SHARED_DEMO_ADAPTER]
    assert len(set(distinct)) == len(distinct), "adapters must be distinguishable"
    # shared-assistant serves initech-code's weights under another name (tenants.demo.yaml).
    assert alone[("globex", SHARED_DEMO_ADAPTER)] == alone[("initech", "initech-code")]
    with concurrent.futures.ThreadPoolExecutor(len(jobs) * 2) as pool:
        futures = {pool.submit(chat_text, *job, 24): job for job in jobs * 2}
        for future, job in futures.items():
            assert future.result() == alone[job], f"{job} differs when batched with others"


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "sk-wrong", ""])
def test_missing_or_bad_key_is_401(server, key):
    resp = post("/v1/chat/completions", chat_body(), key=key)
    assert_openai_error(resp, 401, "AuthenticationError")
    assert httpx.get(f"{BASE_URL}/v1/models").status_code == 401


def test_tenant_header_alone_grants_nothing(server):
    resp = httpx.post(
        f"{BASE_URL}/v1/chat/completions",
        json=chat_body(),
        headers={"X-Tenant": "acme", "OpenAI-Organization": "acme"},
    )
    assert_openai_error(resp, 401)


def test_foreign_adapter_is_answered_exactly_like_an_unknown_model(server):
    foreign = post("/v1/chat/completions", chat_body(model="globex-legal"))
    unknown = post("/v1/chat/completions", chat_body(model="nosuch-model"))  # same length
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json() == json.loads(unknown.text.replace("nosuch-model", "globex-legal"))
    assert assert_openai_error(foreign, 404)["param"] == "model"
    shown = lambda r: {k: v for k, v in r.headers.items() if k not in ("date", "x-request-id")}  # noqa: E731
    assert shown(foreign) == shown(unknown)


@pytest.mark.parametrize(
    "body",
    [
        "{not json",
        "[1, 2]",
        {"model": BASE},  # no messages
        {"model": BASE, "messages": []},
        {"model": BASE, "messages": "hello"},
        {"model": BASE, "messages": MESSAGES, "max_tokens": "ten"},
        {"model": 42, "messages": MESSAGES},
        chat_body(max_tokens=0),
        chat_body(max_tokens=-5),
        chat_body(max_tokens=MAX_MODEL_LEN * 4),  # over the context
        chat_body(n=0),
        chat_body(temperature=-1.0),
        chat_body(top_p=1.5),
    ],
    ids=[
        "bad-json",
        "not-object",
        "no-messages",
        "empty-messages",
        "messages-str",
        "max-tokens-str",
        "model-int",
        "max-tokens-0",
        "max-tokens-neg",
        "over-context",
        "n-0",
        "temperature-neg",
        "top-p-1.5",
    ],
)
def test_invalid_bodies_are_400(server, body):
    assert_openai_error(post("/v1/chat/completions", body), 400)


def test_readiness_names_the_deployments_once_an_engine_runs(server):
    resp = httpx.get(f"{BASE_URL}/ready")
    assert resp.status_code == 200 and resp.json()["ready"] is True
    deployments = resp.json()["deployments"]
    assert deployments["Engine"] == {"status": "HEALTHY", "replicas": {"RUNNING": 2}}
    assert deployments["Ingress"]["status"] == "HEALTHY"


def test_bad_requests_do_not_hurt_the_replicas(server):
    served = Counter()
    for _ in range(8):
        resp = post("/v1/chat/completions", chat_body())
        assert resp.status_code == 200
        served[resp.headers["x-served-by"]] += 1
    assert httpx.get(f"{BASE_URL}/health").status_code == 200


def test_503_with_retry_after_when_no_replica_can_take_more(server):
    # 2 replicas x 6 ongoing + 16 queued = 28 requests can be held; send 60 long ones at once.
    async def one(http: httpx.AsyncClient):
        body = chat_body(model=OWN_ADAPTER["acme"], max_tokens=120, ignore_eos=True)
        headers = {"Authorization": f"Bearer {KEYS['acme']}"}
        return await http.post("/v1/chat/completions", json=body, headers=headers)

    async def burst():
        async with httpx.AsyncClient(base_url=BASE_URL, timeout=300) as http:
            return await asyncio.gather(*(one(http) for _ in range(60)))

    results = asyncio.run(burst())
    statuses = Counter(r.status_code for r in results)
    assert set(statuses) <= {200, 503}, (
        statuses,
        [r.text for r in results if r.status_code not in (200, 503)][:2],
    )
    assert statuses[503] > 0 and statuses[200] >= 12, statuses
    rejected = next(r for r in results if r.status_code == 503)
    assert int(rejected.headers["retry-after"]) >= 1
    assert_openai_error(rejected, 503, "ServiceUnavailableError")
    assert post("/v1/chat/completions", chat_body()).status_code == 200  # recovered


# ---- routing ---------------------------------------------------------------------------------


def served_by(tenant: str, model: str) -> str:
    resp = post("/v1/chat/completions", chat_body(model=model), key=KEYS[tenant])
    assert resp.status_code == 200, resp.text
    return resp.headers["x-served-by"]


def test_requests_for_a_resident_adapter_go_to_its_replica(server):
    """5 adapters, 2 slots per replica. With the default power-of-two router each request would
    land on either replica (p = 1/2 each): 4 x 5 follow-ups all on the first replica would be
    chance with probability 2^-20."""
    jobs = [(t, OWN_ADAPTER[t]) for t in KEYS] + [("acme", SHARED_DEMO_ADAPTER)]
    for tenant, adapter in jobs:
        first = served_by(tenant, adapter)
        followers = {served_by(tenant, adapter) for _ in range(4)}
        assert followers == {first}, f"{adapter}: first on {first}, then {followers}"


def test_a_popular_adapter_spreads_when_its_replica_is_busy(server):
    """The load bound: a burst for one adapter may not pile onto one replica."""
    adapter = "umbrella-med"
    served_by("umbrella", adapter)  # make it resident somewhere

    async def one(http):
        body = chat_body(model=adapter, max_tokens=60, ignore_eos=True)
        headers = {"Authorization": f"Bearer {KEYS['umbrella']}"}
        r = await http.post("/v1/chat/completions", json=body, headers=headers)
        return r.headers.get("x-served-by")

    async def burst():
        async with httpx.AsyncClient(base_url=BASE_URL, timeout=300) as http:
            return await asyncio.gather(*(one(http) for _ in range(10)))

    replicas = Counter(asyncio.run(burst()))
    assert len(replicas) == 2 and None not in replicas, replicas


def test_adapters_are_listed_as_resident_by_the_engines(server):
    """Routing stats published by each engine replica name the adapters it holds."""
    from ray import serve

    handle = serve.get_deployment_handle("Engine", app_name="moelora")
    stats = handle.record_routing_stats.remote().result()
    # Engines know adapters by version: "<owner>/<name>/v<version>", "_shared/<name>/v1".
    expected = {f"{owner}/{name}/v1" for owner, name in OWN_ADAPTER.items()}
    expected.add(f"_shared/{SHARED_DEMO_ADAPTER}/v1")
    assert stats["cpu_adapters"]
    assert set(stats["cpu_adapters"]) <= expected
    assert len(stats["accelerator_adapters"]) <= 2
    assert set(stats["accelerator_adapters"]) <= expected


def test_idle_engines_leave_the_cpu_alone(server):
    """On CPU, vLLM pins its worker (the model) to a core and the worker busy-polls for a second
    after each message. Two things keep that off the cores left to everything else: each
    EngineCore runs on its workers' cores, and an idle replica stops asking vLLM for its
    host-cache residents every routing-stats period (each ask restarted the spin: a core burnt
    while idle)."""
    import psutil

    chat_text("acme", OWN_ADAPTER["acme"], max_tokens=2)
    cores = [p for p in psutil.process_iter() if "EngineCore" in p.name()]
    assert len(cores) == 2  # one per engine replica
    workers = []
    for core in cores:
        own = [w for w in core.children() if "Worker" in w.name()]
        assert own
        workers += own
        pinned = set().union(*(w.cpu_affinity() for w in own))
        assert all(psutil.Process(t.id).cpu_affinity() == sorted(pinned) for t in core.threads())
    time.sleep(4)  # the last request's spin, one stats period, and the spin of its last ask
    before = [w.cpu_times() for w in workers]
    time.sleep(2)
    busy = [
        (after.user + after.system) - (b.user + b.system)
        for b, after in zip(before, (w.cpu_times() for w in workers), strict=True)
    ]
    assert max(busy) < 0.4, f"idle workers used {busy} CPU seconds in 2 s"


# ---- request ids, access log ----------------------------------------------------------------


def test_every_response_carries_one_request_id_and_errors_are_openai_shaped(server):
    ok = post("/v1/chat/completions", chat_body(), headers={"x-request-id": "trace-7"})
    assert ok.status_code == 200 and ok.headers.get_list("x-request-id") == ["trace-7"]
    generated = post("/v1/chat/completions", chat_body())
    assert len(generated.headers.get_list("x-request-id")) == 1
    assert_openai_error(httpx.get(f"{BASE_URL}/v1/no-such-route"), 404)
    assert_openai_error(httpx.get(f"{BASE_URL}/v1/chat/completions"), 405)
    deep = post("/v1/chat/completions", "[" * 5000 + "]" * 5000)
    assert_openai_error(deep, 400)


def test_one_access_log_line_per_request_without_content(server):
    import ray

    marker = "access-log-probe-1"
    resp = post(
        "/v1/chat/completions",
        chat_body(model=OWN_ADAPTER["acme"]),
        headers={"x-request-id": marker},
    )
    assert resp.status_code == 200
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    lines = []
    for _ in range(50):  # Ray writes replica logs asynchronously
        lines = [
            line
            for p in logs.rglob("*Ingress*")
            if p.is_file()
            for line in p.read_text(errors="replace").splitlines()
            if marker in line and '"event": "request"' in line
        ]
        if lines:
            break
        time.sleep(0.2)
    assert len(lines) == 1, lines
    record = json.loads(lines[0][lines[0].index("{") :])
    assert record["tenant"] == "acme" and record["model"] == OWN_ADAPTER["acme"]
    assert record["status"] == 200 and record["replica"] == resp.headers["x-served-by"]
    assert record["completion_tokens"] == 4 and record["prompt_tokens"] > 0
    assert MESSAGES[0]["content"] not in lines[0]


def test_api_keys_never_appear_in_logs(server):
    """Every request of this module carried a key; none may be written to any Ray/Serve/vLLM log."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert any("Ingress" in p.name for p in files)  # the ingress's log is among them
    for path in files:
        text = path.read_bytes()
        for key in KEYS.values():
            assert key.encode() not in text, f"{key} found in {path}"
