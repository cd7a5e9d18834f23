"""The HTTP ingress: OpenAI-compatible API, tenant auth, model resolution, dispatch to engines.

Order of checks for a generation request, each answered with an OpenAI-style JSON error
(app/openai_errors.py):
  1. API key -> tenant (401),                                         app/tenants.py
  2. body -> vLLM's own protocol model (400),
  3. `model` -> base model or an adapter this tenant may use (404, identical for a name that
     does not exist and another tenant's adapter),                    app/adapters.py
  4. dispatch through the engine deployment's handle, the adapter as multiplexed model id, so
     the adapter-aware request router (app/request_router.py) can place it (503 + Retry-After
     when no replica can take it).                                    app/contract.py
Deeper validation (sampling ranges, context length) is vLLM's, in the engine, returned as is.

`build_api` makes the FastAPI app from its dependencies (testable without Ray); `Ingress` is
the Ray Serve deployment that serves it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from app.adapters import AdapterCatalog, ModelNotFound
from app.contract import ReplyHead, ReplyItem, ReplyKind, ReplyTail
from app.logs import get_logger
from app.openai_errors import (
    bad_request,
    install_handlers,
    model_not_found,
    service_unavailable,
    unauthorized,
)
from app.replica_env import reset_niceness
from app.request_log import AccessLogMiddleware, RequestRecord
from app.tenants import TenantDirectory

logger = get_logger("ingress")

SERVED_BY_HEADER = "x-served-by"
Endpoint = Literal["chat", "completion"]


class Replies(Protocol):
    """A reply stream from an engine (Ray's DeploymentResponseGenerator, or a test double)."""

    def __aiter__(self) -> AsyncIterator[ReplyItem]: ...
    async def __anext__(self) -> ReplyItem: ...
    def cancel(self) -> None: ...


class EngineClient:
    """Calls the engine deployment. Configured handles are cached per adapter: `.options()`
    builds a new handle (and its router state) on every call."""

    MAX_CACHED_HANDLES = 4096

    def __init__(self, handle):
        self._handle = handle
        self._by_adapter: OrderedDict[str, Any] = OrderedDict()

    def _configured(self, adapter: str):
        handle = self._by_adapter.get(adapter)
        if handle is None:
            handle = self._handle.options(stream=True, multiplexed_model_id=adapter)
            self._by_adapter[adapter] = handle
            if len(self._by_adapter) > self.MAX_CACHED_HANDLES:
                self._by_adapter.popitem(last=False)
        return handle

    def call(self, endpoint: Endpoint, request, adapter: str | None) -> Replies:
        return getattr(self._configured(adapter or ""), endpoint).remote(request)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


def _stream_error_event(message: str) -> str:
    body = {
        "error": {"message": message, "type": "ServiceUnavailableError", "param": None, "code": 503}
    }
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"


async def relay(replies: Replies, record: RequestRecord) -> AsyncIterator[str]:
    """A stream's SSE text to the client; its token counts to the access record. If the engine
    fails mid-stream the client gets an SSE error event, not a cut connection; if the client
    goes away the engine request is cancelled."""
    finished = False
    try:
        async for item in replies:
            if isinstance(item, str):
                yield item
            elif isinstance(item, ReplyTail):
                record.prompt_tokens = item.prompt_tokens
                record.completion_tokens = item.completion_tokens
        finished = True
    except Exception:  # noqa: BLE001 - any failure of the engine side ends the stream honestly
        logger.exception("stream %s failed in the engine", record.request_id)
        finished = True
        yield _stream_error_event("The engine serving this stream failed; retry the request.")
    finally:
        if not finished:
            replies.cancel()


def build_api(
    engine: EngineClient, tenants: TenantDirectory, catalog: AdapterCatalog, retry_after_s: int
) -> FastAPI:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList

    protocols = {"chat": ChatCompletionRequest, "completion": CompletionRequest}
    api = FastAPI(title="moelora-serve", docs_url=None, redoc_url=None)
    install_handlers(api)
    api.add_middleware(AccessLogMiddleware)

    @api.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        tenant = tenants.authenticate(request.headers.get("authorization"))
        if tenant is None:
            return unauthorized()
        request.state.record.tenant = tenant.name
        base = catalog.base_model
        cards = [ModelCard(id=base, root=base, owned_by="moelora-serve")]
        for a in catalog.visible_to(tenant):
            owner = "shared" if a.shared else tenant.name
            cards.append(ModelCard(id=a.name, root=a.name, parent=base, owned_by=owner))
        return JSONResponse(ModelList(data=cards).model_dump())

    async def generate(endpoint: Endpoint, http_request: Request) -> Response:
        record: RequestRecord = http_request.state.record
        tenant = tenants.authenticate(http_request.headers.get("authorization"))
        if tenant is None:
            return unauthorized()
        record.tenant = tenant.name
        try:
            body = json.loads(await http_request.body())
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            return bad_request(f"Invalid JSON body: {exc}")
        except RecursionError:
            return bad_request("Invalid JSON body: nested too deeply.")
        if not isinstance(body, dict):
            return bad_request("The body must be a JSON object.")
        try:
            request = protocols[endpoint].model_validate(body)
        except ValidationError as exc:
            return bad_request(_validation_message(exc))
        if endpoint == "chat" and not request.messages:
            return bad_request("messages must not be empty.", "messages")
        try:
            adapter = catalog.resolve(request.model, tenant)
        except ModelNotFound:
            return model_not_found(request.model)
        record.model, record.stream = request.model, bool(request.stream)

        replies = engine.call(endpoint, request, adapter)
        try:
            head: ReplyHead = await replies.__anext__()
        except (BackPressureError, DeploymentUnavailableError) as exc:
            # Rejected before reaching a replica: nothing to cancel.
            logger.warning("no engine replica can take the request: %s", type(exc).__name__)
            return service_unavailable(retry_after_s)
        record.replica = head.replica_id
        headers = {SERVED_BY_HEADER: head.replica_id}
        if head.kind is ReplyKind.STREAM:
            return StreamingResponse(
                relay(replies, record), media_type="text/event-stream", headers=headers
            )
        record.prompt_tokens, record.completion_tokens = head.prompt_tokens, head.completion_tokens
        return Response(
            head.body, status_code=head.status, media_type="application/json", headers=headers
        )

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate("chat", request)

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate("completion", request)

    return api


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """The Ray Serve deployment serving `build_api`'s app; one replica holds many requests (it
    only awaits engines), more replicas add HTTP parsing capacity, not model capacity."""

    def __init__(
        self, engine, tenants: TenantDirectory, catalog: AdapterCatalog, retry_after_s: int
    ):
        reset_niceness()
        self._api = build_api(EngineClient(engine), tenants, catalog, retry_after_s)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._api
