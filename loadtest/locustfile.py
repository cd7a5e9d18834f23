"""Locust load test: demo tenants streaming chat completions through their own adapters.

    .venv/bin/locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 60s \
        -H http://localhost:8000 --csv /tmp/moelora --html /tmp/moelora.html

Each simulated user is one demo tenant (app.builtin_model.DEMO_TENANTS) and sends streaming chat
requests to its own adapter, sometimes to the base model. Besides the request itself, it reports
`time_to_first_token` and `inter_token_latency` (ms) as their own Locust entries, so the summary
table and CSV carry their percentiles. Set MOELORA_MAX_TOKENS to change the output length.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

from app.builtin_model import BUILTIN_MODEL_NAME, DEMO_TENANTS

TENANTS = [(t.api_key, t.adapter) for t in DEMO_TENANTS]
BASE_MODEL = os.environ.get("MOELORA_BASE_MODEL", BUILTIN_MODEL_NAME)
MAX_TOKENS = int(os.environ.get("MOELORA_MAX_TOKENS", "64"))
PROMPTS = [
    "Where is my order?",
    "What does clause seven mean?",
    "Why is the build failing?",
    "Can you summarise the report?",
    "Which dose is recommended?",
]


def _metric(name: str, ms: float, length: int = 0) -> None:
    events.request.fire(
        request_type="METRIC",
        name=name,
        response_time=ms,
        response_length=length,
        exception=None,
        context={},
    )


class Tenant(HttpUser):
    wait_time = between(0.1, 1.0)

    def on_start(self) -> None:
        self.key, self.adapter = random.choice(TENANTS)

    @task
    def stream_chat(self) -> None:
        model = self.adapter if random.random() < 0.9 else BASE_MODEL
        body = {
            "model": model,
            "stream": True,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.7,
            "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
        }
        start = time.perf_counter()
        first = last = None
        tokens = 0
        with self.client.post(
            "/v1/chat/completions",
            json=body,
            stream=True,
            catch_response=True,
            headers={"Authorization": f"Bearer {self.key}"},
            name=f"chat {'adapter' if model != BASE_MODEL else 'base'}",
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return
            for line in resp.iter_lines():
                if not line or not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    tokens += 1
            resp.success()
        if first is not None:
            _metric("time_to_first_token", (first - start) * 1000, tokens)
            if tokens > 1:
                _metric("inter_token_latency", (last - first) * 1000 / (tokens - 1), tokens)
