"""Schema-driven fuzzing of the running app with schemathesis: zero 5xx, every error in the
OpenAI shape.

The app publishes no schema (its API is OpenAI's), so the test builds one from the request
models the server itself validates with (vLLM's ChatCompletionRequest / CompletionRequest),
cut to the fields a tenant may send (app/request_policy.py), with `model` one of the names the
tenant may use and small token counts, so that valid cases reach the engine and generate. Both
schema-conforming and schema-violating cases are sent (schemathesis' positive and negative
generation), with the tenant's key; bounded so that it runs in CI in about a minute.
"""

from __future__ import annotations

import copy
import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from pydantic.json_schema import models_json_schema
from schemathesis import GenerationMode

from app.request_policy import ALLOWED_FIELDS
from tests.integration.app_under_test import BASE, BASE_URL, KEYS, OWN_ADAPTER

pytestmark = pytest.mark.engine

EXAMPLES_PER_OPERATION = 40
MODELS = [BASE, OWN_ADAPTER["acme"], "no-such-model"]


def openapi_schema() -> dict:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    _, top = models_json_schema(
        [(ChatCompletionRequest, "validation"), (CompletionRequest, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    schemas = top["$defs"]
    for name, endpoint in (("ChatCompletionRequest", "chat"), ("CompletionRequest", "completion")):
        body = schemas[name]
        body["properties"] = {
            k: v for k, v in body["properties"].items() if k in ALLOWED_FIELDS[endpoint]
        }
        body["properties"]["model"] = {"type": "string", "enum": MODELS}
        for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
            if field in body["properties"]:
                body["properties"][field] = {"type": "integer", "minimum": 0, "maximum": 8}
        body["required"] = sorted(set(body.get("required", [])) | {"model"})

    def post(ref: str) -> dict:
        content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}
        return {
            "post": {
                "requestBody": {"required": True, "content": content},
                "responses": {"200": {"description": "OK"}},
            }
        }

    get = {"get": {"responses": {"200": {"description": "OK"}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "moelora-serve (built for fuzzing)", "version": "1"},
        "paths": {
            "/v1/chat/completions": post("ChatCompletionRequest"),
            "/v1/completions": post("CompletionRequest"),
            "/v1/models": copy.deepcopy(get),
            "/health": copy.deepcopy(get),
            "/ready": copy.deepcopy(get),
        },
        "components": {"schemas": schemas},
    }


schema = schemathesis.openapi.from_dict(openapi_schema())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_server_error_and_every_error_is_openai_shaped(case, server):
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {KEYS['acme']}"}
    resp = case.call(base_url=BASE_URL, timeout=60)
    assert resp.status_code < 500 or resp.status_code == 503, (resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        content_type = resp.headers.get("content-type") or [""]
        assert content_type[0].startswith("application/json"), resp.text[:200]
        if case.path != "/ready":  # /ready's 503 body is its readiness report
            err = json.loads(resp.text)["error"]
            assert set(err) == {"message", "type", "param", "code"}, err
            assert err["code"] == resp.status_code
