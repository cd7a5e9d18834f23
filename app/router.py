"""The HTTP ingress: OpenAI-compatible API, tenant auth, model resolution, dispatch to engines.

Order of checks for a generation request, each answered with an OpenAI-style JSON error:
  1. API key -> tenant (401),
  2. body -> vLLM's own protocol model (400),
  3. `model` -> base model or an adapter this tenant may use (404, identical for a name that does
     not exist and another tenant's adapter),
  4. dispatch through the engine deployment's handle, the adapter as multiplexed model id so the
     adapter-aware request router can place it (503 + Retry-After when no replica can take it).
Deeper validation (sampling ranges, context length) is vLLM's, in the engine, returned as is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from app.adapters import AdapterRegistry, ModelNotFound
from app.config import AppConfig
from app.tenants import TenantDirectory

logger = logging.getLogger(__name__)

SERVED_BY_HEADER = "x-served-by"

api = FastAPI(title="moelora-serve", docs_url=None, redoc_url=None)


def error_response(
    status: HTTPStatus, message: str, err_type: str, param: str | None = None, headers=None
) -> JSONResponse:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status.value}}
    return JSONResponse(body, status_code=status.value, headers=headers)


def unauthorized() -> JSONResponse:
    return error_response(
        HTTPStatus.UNAUTHORIZED,
        "Invalid or missing API key. Pass it as 'Authorization: Bearer <key>'.",
        "AuthenticationError",
        headers={"WWW-Authenticate": "Bearer"},
    )


def model_not_found(model: str) -> JSONResponse:
    # Same text for unknown names and other tenants' adapters: no existence oracle.
    return error_response(
        HTTPStatus.NOT_FOUND, f"The model `{model}` does not exist.", "NotFoundError", "model"
    )


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


async def _sse(first_chunk: str, replies) -> AsyncIterator[str]:
    """vLLM's SSE chunks as they come; cancels the engine request if the client goes away."""
    finished = False
    try:
        yield first_chunk
        async for _, chunk in replies:
            yield chunk
        finished = True
    finally:
        if not finished:
            replies.cancel()


@serve.deployment(name="Router")
@serve.ingress(api)
class Router:
    def __init__(self, engine, config: dict[str, Any]):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        cfg = AppConfig.model_validate(config)
        self.engine = engine
        self.tenants = TenantDirectory(cfg.tenants)
        self.registry = AdapterRegistry(cfg.engine.served_model_name, cfg.adapters)
        self.retry_after_s = cfg.retry_after_s
        self.protocols = {"chat": ChatCompletionRequest, "completion": CompletionRequest}

    @api.get("/health")
    async def health(self) -> Response:
        return Response(status_code=200)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList

        tenant = self.tenants.authenticate(request.headers.get("authorization"))
        if tenant is None:
            return unauthorized()
        base = self.registry.base_model
        cards = [ModelCard(id=base, root=base, owned_by="moelora-serve")]
        for a in self.registry.visible_to(tenant):
            owner = "shared" if a.shared else tenant.name
            cards.append(ModelCard(id=a.name, root=a.name, parent=base, owned_by=owner))
        return JSONResponse(ModelList(data=cards).model_dump())

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate("chat", request)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._generate("completion", request)

    async def _generate(self, kind: str, http_request: Request) -> Response:
        tenant = self.tenants.authenticate(http_request.headers.get("authorization"))
        if tenant is None:
            return unauthorized()
        try:
            body = json.loads(await http_request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_response(HTTPStatus.BAD_REQUEST, f"Invalid JSON body: {exc}", "BadRequestError")
        if not isinstance(body, dict):
            return error_response(
                HTTPStatus.BAD_REQUEST, "The body must be a JSON object.", "BadRequestError"
            )
        try:
            request = self.protocols[kind].model_validate(body)
        except ValidationError as exc:
            return error_response(
                HTTPStatus.BAD_REQUEST, _validation_message(exc), "BadRequestError"
            )
        if kind == "chat" and not request.messages:
            return error_response(
                HTTPStatus.BAD_REQUEST, "messages must not be empty.", "BadRequestError", "messages"
            )
        try:
            adapter = self.registry.resolve(request.model, tenant)
        except ModelNotFound:
            return model_not_found(request.model)
        return await self._dispatch(kind, request, adapter)

    async def _dispatch(self, kind: str, request, adapter: str | None) -> Response:
        handle = self.engine.options(stream=True, multiplexed_model_id=adapter or "")
        replies = handle.generate.remote(kind, request, adapter)
        try:
            _, replica_id = await replies.__anext__()
            first_kind, payload = await replies.__anext__()
        except (BackPressureError, DeploymentUnavailableError) as exc:
            # Rejected before reaching a replica: nothing to cancel.
            logger.warning("no engine replica can take the request: %s", type(exc).__name__)
            return error_response(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "The server is at capacity. Retry after a short wait.",
                "ServiceUnavailableError",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        headers = {SERVED_BY_HEADER: replica_id}
        if first_kind == "error":
            return JSONResponse(payload, status_code=payload["error"]["code"], headers=headers)
        if first_kind == "json":
            return JSONResponse(payload, headers=headers)
        return StreamingResponse(
            _sse(payload, replies), media_type="text/event-stream", headers=headers
        )

