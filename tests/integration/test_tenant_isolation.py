"""No tenant observes another through the shared prefix cache.

vLLM reuses cached KV blocks for any request with the same prefix (and adapter) unless their
cache salts differ, and a hit shows in the time to first token. The ingress salts every request
with its tenant, so a prompt one tenant sent never makes another's faster. Checked exactly, not
by timing: vLLM reports the prompt tokens it served from cache (usage.prompt_tokens_details);
benchmarks/security/prefix_cache_timing.py repeats the timing attack itself (docs/reliability.md).
"""

from __future__ import annotations

import uuid

import pytest

from app.builtin_model import SHARED_DEMO_ADAPTER
from tests.integration.app_under_test import KEYS, chat_body, post

pytestmark = pytest.mark.engine


def cached_tokens(tenant: str, prompt: str, **body) -> int:
    messages = [{"role": "user", "content": prompt}]
    body = chat_body(model=SHARED_DEMO_ADAPTER, max_tokens=1, messages=messages, **body)
    resp = post("/v1/chat/completions", body, key=KEYS[tenant])
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def test_a_prompt_cached_for_one_tenant_is_a_miss_for_another(server):
    # Unique, long enough to fill several KV blocks; through the shared adapter, which both
    # tenants may use and the request router keeps on one replica.
    prompt = f"{uuid.uuid4()} " + "the quick brown fox jumps over the lazy dog " * 5
    assert cached_tokens("acme", prompt) == 0
    # The same tenant hits its own cache (so the check below can fail)...
    assert cached_tokens("acme", prompt) >= 16
    # ...another tenant sending the same prompt does not, whatever salt it picks.
    assert cached_tokens("globex", prompt) == 0
    assert cached_tokens("globex", prompt, cache_salt="acme:") == 0
    assert cached_tokens("globex", prompt, cache_salt="acme") == 0


def test_a_client_salt_only_narrows_within_its_tenant(server):
    prompt = f"{uuid.uuid4()} " + "pack my box with five dozen liquor jugs " * 5
    assert cached_tokens("acme", prompt, cache_salt="team-a") == 0
    assert cached_tokens("acme", prompt, cache_salt="team-a") >= 16
    assert cached_tokens("acme", prompt, cache_salt="team-b") == 0
