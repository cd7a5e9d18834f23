"""Talking to the admin API and to tenants in the tenancy tests."""

from __future__ import annotations

import httpx
import openai

from tests.integration.app_under_test import BASE_URL

ADMIN_KEY = "sk-admin-test"
BUCKET = "adapters"
# S3 prefix -> the demo adapter whose files are uploaded there.
S3_ADAPTERS = {"acme-support": "acme-support", "globex-legal": "globex-legal"}


def admin(method: str, path: str, body=None, key: str | None = ADMIN_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(
        method, f"{BASE_URL}/admin/v1{path}", json=body, headers=headers, timeout=120
    )


def ok(resp: httpx.Response, status: int = 200):
    assert resp.status_code == status, resp.text
    return resp.json()


def tenant_client(key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key=key, max_retries=0)


def greedy_text(key: str, model: str, max_tokens: int = 12) -> str:
    out = tenant_client(key).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Where is my order?"}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.model == model  # the client's own name comes back, not the engine's
    return out.choices[0].message.content
