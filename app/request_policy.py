"""What a tenant's request body may contain, and what the server sets itself.

vLLM's protocol models accept many fields meant for the operator, not for a tenant on a shared
replica: `priority`, `request_id`, `kv_transfer_params`, `vllm_xargs`, a custom
`chat_template`, beam search... A tenant may set only the fields listed here (the OpenAI API and
vLLM's per-request sampling extras); any other field is refused with a 400 naming it.

The server sets `cache_salt`: vLLM shares its prefix cache between requests unless their salts
differ, and a cache hit is visible in the time to first token, so without a per-tenant salt one
tenant could learn what another sent. A tenant's own `cache_salt` only narrows within its tenant.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# The OpenAI API's fields and vLLM's sampling extras a tenant may use.
_SAMPLING = {
    "model", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "seed", "stop", "stream", "stream_options", "temperature", "top_p", "user", "top_k", "min_p",
    "repetition_penalty", "stop_token_ids", "include_stop_str_in_output", "ignore_eos",
    "min_tokens", "skip_special_tokens", "spaces_between_special_tokens", "cache_salt",
}  # fmt: skip
ALLOWED_FIELDS = {
    "chat": _SAMPLING | {
        "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
        "tool_choice", "parallel_tool_calls", "add_generation_prompt", "continue_final_message",
        "echo",
    },
    "completion": _SAMPLING | {"prompt", "echo", "suffix"},
}  # fmt: skip


class RequestLimits(BaseModel):
    """Bounds on one request (config `request_limits`), checked before anything reaches vLLM."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    body_timeout_s: float = Field(default=30.0, gt=0, description="time to receive the body")
    # How long a request may wait for an engine replica to take it (queued behind others, or no
    # replica running yet, or its replica just died) before it gets a 503 + Retry-After.
    accept_timeout_s: float = Field(default=30.0, gt=0)
    # Replicas tried for one request when a replica cannot serve before taking it (its actor
    # or engine died); never retried once taken (app/dispatch.py).
    dispatch_attempts: int = Field(default=3, ge=1)
    max_n: int = Field(default=8, ge=1)
    max_stop: int = Field(default=16, ge=0, description="stop strings and stop_token_ids, each")
    max_logit_bias: int = Field(default=300, ge=0)


@dataclass(frozen=True)
class PolicyViolation(Exception):
    message: str
    param: str | None = None


def check_fields(endpoint: str, body: Mapping[str, Any]) -> None:
    """Every key of the body must be one a tenant may set."""
    allowed = ALLOWED_FIELDS[endpoint]
    for key in body:
        if key not in allowed:
            name = key if len(key) <= 64 else key[:64] + "…"
            raise PolicyViolation(f"The field `{name}` is not supported by this server.", name)


def check_limits(request, limits: RequestLimits) -> None:
    """Bounds vLLM does not apply itself (it would run n=1000 or a 10k-entry logit_bias)."""
    if (request.n or 1) > limits.max_n:
        raise PolicyViolation(f"n must be at most {limits.max_n}.", "n")
    stop = request.stop
    if isinstance(stop, list) and len(stop) > limits.max_stop:
        raise PolicyViolation(f"At most {limits.max_stop} stop sequences.", "stop")
    if len(request.stop_token_ids or ()) > limits.max_stop:
        raise PolicyViolation(f"At most {limits.max_stop} stop_token_ids.", "stop_token_ids")
    if len(request.logit_bias or {}) > limits.max_logit_bias:
        raise PolicyViolation(
            f"logit_bias may have at most {limits.max_logit_bias} entries.", "logit_bias"
        )


def tenant_cache_salt(tenant: str, client_salt: str | None) -> str:
    """The prefix-cache salt of a tenant's request. Tenant names cannot contain ':', so no
    tenant can produce another's prefix, whatever salt it sends (vLLM caps salts at 128
    characters: the client's part is hashed)."""
    narrowed = hashlib.sha256(client_salt.encode()).hexdigest()[:32] if client_salt else ""
    return f"{tenant}:{narrowed}"


def prompt_chars(request) -> int:
    """Prompt length in characters, before any tokenizing: the tenant ceiling on prompt size
    (app/quotas.py) and the fair queue's cost estimate (app/engine.py) both use it."""
    prompt = getattr(request, "prompt", None)
    if prompt is None:  # chat: messages are dicts or pydantic models, content text or parts
        contents = (
            m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
            for m in request.messages
        )
        return sum(len(str(c or "")) for c in contents)
    return len(prompt) if isinstance(prompt, str) else len(str(prompt))
