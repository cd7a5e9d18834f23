"""The prefix-cache timing attack between tenants, against a running server.

    .venv/bin/python -m benchmarks.security.prefix_cache_timing --url http://127.0.0.1:8000 \
        [--model builtin-moe] [--trials 20]

Each trial: the victim (tenant globex) sends a fresh ~700-token prompt P (400 words). The
attacker (tenant acme) then sends P and a fresh prompt Q of the same length, in random order,
and times the first token of each. If P is served from the victim's cached KV blocks it comes
back faster: the attacker "wins" a trial when TTFT(P) < TTFT(Q). Without isolation the attacker
wins every trial; with per-tenant cache salts, wins are at chance level (about half).
"""

from __future__ import annotations

import argparse
import random
import time
import uuid

import httpx

from app.builtin_model import BUILTIN_MODEL_NAME, DEMO_TENANTS

WORDS = "order invoice refund parcel contract clause build test dose report".split()


def fresh_prompt(rng: random.Random, words: int) -> str:
    return f"{uuid.uuid4()} " + " ".join(rng.choice(WORDS) for _ in range(words))


def ttft_ms(http: httpx.Client, key: str, model: str, prompt: str) -> float:
    body = {
        "model": model,
        "max_tokens": 1,
        "stream": True,
        "messages": [{"role": "user", "content": prompt}],
    }
    t0 = time.perf_counter()
    with http.stream(
        "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                return (time.perf_counter() - t0) * 1000
    raise RuntimeError("no token came back")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=BUILTIN_MODEL_NAME)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--words", type=int, default=400)  # ~700 tokens
    args = parser.parse_args()
    attacker, victim = DEMO_TENANTS[0], DEMO_TENANTS[1]
    rng = random.Random(0)
    wins, rows = 0, []
    with httpx.Client(base_url=args.url, timeout=120) as http:
        ttft_ms(http, attacker.api_key, args.model, fresh_prompt(rng, args.words))  # warm-up
        for _ in range(args.trials):
            secret, fresh = fresh_prompt(rng, args.words), fresh_prompt(rng, args.words)
            ttft_ms(http, victim.api_key, args.model, secret)
            order = [("probe", secret), ("fresh", fresh)]
            rng.shuffle(order)
            times = {name: ttft_ms(http, attacker.api_key, args.model, p) for name, p in order}
            wins += times["probe"] < times["fresh"]
            rows.append(times)
    probe = sorted(r["probe"] for r in rows)[len(rows) // 2]
    fresh = sorted(r["fresh"] for r in rows)[len(rows) // 2]
    print("| model | trials | attacker wins | TTFT p50 victim's prompt | TTFT p50 fresh prompt |")
    print("|---|---|---|---|---|")
    print(f"| {args.model} | {args.trials} | {wins} | {probe:.1f} ms | {fresh:.1f} ms |")


if __name__ == "__main__":
    main()
