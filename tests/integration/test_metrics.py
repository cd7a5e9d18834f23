"""Per-tenant metrics of the ingress, read from Ray's real metrics export (Prometheus text)."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from tests.integration.app_under_test import (
    BASE_URL,
    KEYS,
    METRICS_PORT,
    OWN_ADAPTER,
    chat_body,
    post,
)
from tests.integration.conftest import USAGE_PERIOD_S

pytestmark = pytest.mark.engine


def scrape_until(pattern: str, timeout_s: float = 60) -> str:
    """Ray exports on an interval (~10 s): poll until a sample matching `pattern` is there."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
        if re.search(pattern, text, re.MULTILINE):
            return text
        time.sleep(2)
    raise AssertionError(f"no sample matching {pattern!r} in:\n{text[-3000:]}")


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} {labels} not exported"
    return total


def test_requests_tokens_and_latency_are_exported_per_tenant_and_adapter(server):
    adapter = OWN_ADAPTER["umbrella"]
    for _ in range(3):
        assert post(
            "/v1/chat/completions", chat_body(model=adapter), key=KEYS["umbrella"]
        ).is_success
    stream = chat_body(model=adapter, stream=True, max_tokens=5, ignore_eos=True)
    with httpx.stream(
        "POST",
        f"{BASE_URL}/v1/chat/completions",
        json=stream,
        headers={"Authorization": f"Bearer {KEYS['umbrella']}"},
    ) as resp:
        assert resp.status_code == 200 and list(resp.iter_lines())
    assert post("/v1/chat/completions", chat_body(model="nosuch-xyz")).status_code == 404
    assert post("/v1/chat/completions", chat_body(), key="sk-wrong").status_code == 401

    text = scrape_until(
        r'^ray_moelora_time_to_first_token_seconds_count\{.*tenant="umbrella"', timeout_s=90
    )
    ok = {"tenant": "umbrella", "model": adapter, "status": "200"}
    assert sample(text, "ray_moelora_requests_total", **ok) >= 4
    tokens = {"tenant": "umbrella", "model": adapter}
    assert sample(text, "ray_moelora_completion_tokens_total", **tokens) >= 3 * 4 + 5
    assert sample(text, "ray_moelora_prompt_tokens_total", **tokens) > 0
    assert sample(text, "ray_moelora_request_duration_seconds_count", **tokens) >= 4
    assert sample(text, "ray_moelora_time_to_first_token_seconds_count", **tokens) >= 1
    # Unknown names and failed authentication are counted, never as a client-chosen label.
    assert sample(text, "ray_moelora_requests_total", tenant="acme", model="-", status="404") >= 1
    assert sample(text, "ray_moelora_requests_total", tenant="unauthenticated", status="401") >= 1
    assert "nosuch-xyz" not in text and "sk-wrong" not in text
    # Streams: the mean gap between tokens; their text came over the token link, not Ray.
    assert sample(text, "ray_moelora_inter_token_latency_seconds_count", **tokens) >= 1
    assert sample(text, "ray_moelora_streams_total", transport="link") >= 1
    assert 'transport="ray"' not in text


def test_engine_replicas_export_queueing_and_adapter_metrics(server):
    for tenant in ("initech", "umbrella"):
        body = chat_body(model=OWN_ADAPTER[tenant], max_tokens=2)
        assert post("/v1/chat/completions", body, key=KEYS[tenant]).is_success
    text = scrape_until(r'^ray_moelora_fair_queue_wait_seconds_count\{.*tenant="initech"', 90)
    assert sample(text, "ray_moelora_fair_queue_wait_seconds_count", tenant="initech") >= 1
    assert sample(text, "ray_moelora_adapter_loads_total", outcome="loaded") >= 1
    assert sample(text, "ray_moelora_adapter_load_seconds_count") >= 1
    text = scrape_until(r'^ray_moelora_resident_adapters\{.*tier="cpu"', 60)
    assert sample(text, "ray_moelora_resident_adapters", tier="cpu") >= 1


def _counter_sums(text: str) -> dict[str, float]:
    """Totals over all label sets of the counters that usage accounting reconciles."""
    names = {
        "engine_seconds": "ray_moelora_tenant_engine_seconds_total",
        "busy_seconds": "ray_moelora_engine_busy_seconds_total",
        "prompt": "ray_moelora_prompt_tokens_total",
        "completion": "ray_moelora_completion_tokens_total",
        "vllm_prompt": "ray_vllm_prompt_tokens_total",
        "vllm_generation": "ray_vllm_generation_tokens_total",
    }
    sums = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        for key, name in names.items():
            if line.startswith(name + "{") or line.startswith(name + " "):
                sums[key] += float(line.rsplit(" ", 1)[1])
    return sums


def _settled_sums(previous: dict[str, float] | None = None, timeout_s: float = 90) -> dict:
    """Counter totals once two scrapes 12 s apart agree (Ray exports every ~10 s) and, given
    `previous`, once they have moved past it."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        now = _counter_sums(httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text)
        moved = previous is None or now["vllm_generation"] > previous["vllm_generation"]
        if now == last and moved:
            return now
        last = now
        time.sleep(12)
    raise AssertionError(f"counters did not settle: {last}")


def _usage_lines(usage_dir) -> dict[str, list[dict]]:
    """Each engine replica's usage lines so far, by file."""
    return {
        path.name: [json.loads(line) for line in path.read_text().splitlines()]
        for path in usage_dir.glob("usage-*.jsonl")
    }


def test_usage_per_tenant_adds_up_to_the_engines_own_totals(server, usage_dir):
    """Usage accounting (issue 11): over a mixed burst from every tenant, the per-tenant token
    counters add up to vLLM's own prompt and generation token counters, and the engine time
    charged to tenants adds up to the engines' busy time, each within 1%; the usage files get
    exactly the burst's requests and tokens, per tenant."""
    import concurrent.futures

    before = _settled_sums()  # quiet for 12 s: every earlier request is in a written period
    lines_before = {name: len(lines) for name, lines in _usage_lines(usage_dir).items()}

    def one(i: int) -> tuple[int, int]:
        tenant = list(KEYS)[i % len(KEYS)]
        body = chat_body(
            model=OWN_ADAPTER[tenant] if i % 3 else chat_body()["model"],
            max_tokens=4 + (i * 7) % 29,
            ignore_eos=True,
            messages=[{"role": "user", "content": "word " * (3 + i % 17)}],
        )
        resp = post("/v1/chat/completions", body, key=KEYS[tenant])
        assert resp.is_success, resp.text
        usage = resp.json()["usage"]
        return usage["prompt_tokens"], usage["completion_tokens"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answered = list(pool.map(one, range(32)))
    prompt, completion = (sum(col) for col in zip(*answered, strict=True))
    by_tenant: dict[str, list[int]] = {}
    for i, (p, c) in enumerate(answered):
        totals = by_tenant.setdefault(list(KEYS)[i % len(KEYS)], [0, 0, 0])
        totals[0] += 1
        totals[1] += p
        totals[2] += c

    after = _settled_sums(before)
    delta = {k: after[k] - before[k] for k in after}
    assert delta["prompt"] == prompt and delta["completion"] == completion, (delta, answered)
    assert delta["vllm_prompt"] == pytest.approx(delta["prompt"], rel=0.01), delta
    assert delta["vllm_generation"] == pytest.approx(delta["completion"], rel=0.01), delta
    assert delta["busy_seconds"] > 0
    assert delta["engine_seconds"] == pytest.approx(delta["busy_seconds"], rel=0.01), delta

    time.sleep(2 * USAGE_PERIOD_S)  # the burst's last period is written
    written: dict[str, list[float]] = {}
    new_lines = [
        line
        for name, lines in _usage_lines(usage_dir).items()
        for line in lines[lines_before.get(name, 0) :]
    ]
    for line in new_lines:
        totals = written.setdefault(line["tenant"], [0, 0, 0, 0.0])
        for k, key in enumerate(("requests", "prompt_tokens", "completion_tokens")):
            totals[k] += line[key]
        totals[3] += line["engine_seconds"]
    assert {t: v[:3] for t, v in written.items()} == by_tenant
    charged = sum(v[3] for v in written.values())
    print(f"usage: counters {delta}; usage files {written}")
    assert charged == pytest.approx(delta["busy_seconds"], rel=0.01), (written, delta)
