"""The HTTP ingress: OpenAI-compatible API, tenant auth, model resolution, dispatch to engines.

Order of checks for a generation request, each answered with an OpenAI-style JSON error
(app/openai_errors.py):
  1. API key -> tenant (401; 403 if disabled),                        app/tenancy.py
  2. body -> vLLM's own protocol model, field allowlist and limits (400), app/request_policy.py
  3. `model` -> base model, the tenant's own adapter, or a shared one (404, identical for a name
     that does not exist and another tenant's adapter),              app/tenancy.py
  4. the tenant's ceilings (400/403) and rates (429 + Retry-After),   app/quotas.py
  5. dispatch through the engine deployment's handle with the adapter version as multiplexed
     model id, so the adapter-aware request router (app/request_router.py) can place it;
     retried on another replica if one cannot serve; 503 + Retry-After when none takes it.
                                                                       app/dispatch.py
Admin routes (/admin/v1, their own credential) are app/admin_api.py.
Deeper validation (sampling ranges, context length) is vLLM's, in the engine, returned as is.

`build_api` makes the FastAPI app from its dependencies (testable without Ray); `Ingress` is
the Ray Serve deployment that serves it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http import HTTPStatus
from typing import Any

import ray
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve

from app.admin_api import build_admin_router
from app.contract import ReplyKind, ReplyTail
from app.dispatch import (
    Endpoint,
    EngineClient,
    FleetWatch,
    NoEngine,
    Readiness,
    Replies,
    dispatch,
    routable_replicas,
)
from app.logs import get_logger
from app.metrics import RequestMetrics
from app.openai_errors import (
    bad_request,
    echo,
    error_body,
    error_response,
    install_handlers,
    model_not_found,
    service_unavailable,
    too_large,
    unauthorized,
)
from app.quotas import check_request_limits
from app.registry_service import TenantView
from app.replica_env import reset_niceness
from app.request_log import AccessLogMiddleware, RequestRecord
from app.request_policy import (
    PolicyViolation,
    RequestLimits,
    check_fields,
    check_limits,
    prompt_chars,
    tenant_cache_salt,
)
from app.tenancy import Caller, GatewayTrust, Refused, Tenancy
from app.token_link import Inbox, LinkLost, TokenSink

logger = get_logger("ingress")

SERVED_BY_HEADER = "x-served-by"


def materialized(value):
    """`value` with every lazily validated iterable turned into a list. vLLM's chat message
    types declare some fields `Iterable[...]` (e.g. an assistant message's content parts), which
    pydantic validates lazily as a ValidatorIterator: consumed here, a bad item is a 400 now
    (a ValidationError), and the request can cross the Ray hop (an iterator cannot be pickled)."""
    if isinstance(value, dict):
        return {k: materialized(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [materialized(v) for v in value]
    if isinstance(value, Iterator):
        return [materialized(v) for v in value]
    return value


def refusal_response(refused: Refused) -> Response:
    if refused.status == HTTPStatus.UNAUTHORIZED:
        return unauthorized()
    return error_response(refused.status, refused.message, refused.param)


def rate_limited(admission) -> Response:
    response = error_response(
        429, f"Rate limit reached for this tenant (limit {admission.limit}).", admission.limit
    )
    response.headers["Retry-After"] = str(admission.retry_after_header)
    return response


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


def _stream_error_event(message: str) -> str:
    body = error_body(HTTPStatus.SERVICE_UNAVAILABLE, message)
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"


# How long a linked stream's END frame may trail its ReplyTail (both are sent at once, on two
# connections); beyond it the link was lost and the client gets an error event.
LINK_END_GRACE_S = 5.0


async def relay(
    replies: Replies,
    record: RequestRecord,
    inbox: Inbox,
    on_close: Callable[[], None] = lambda: None,
) -> AsyncIterator[str]:
    """A stream's SSE text to the client, whichever way it comes (the token link fills `inbox`,
    text through Ray is put there too); its token counts to the access record. Everything that
    arrived since the last write goes out as one write. If the engine fails mid-stream the
    client gets an SSE error event, not a cut connection; if the client goes away the engine
    request is cancelled."""
    reading = asyncio.create_task(_read_replies(replies, record, inbox))
    finished = False
    try:
        while True:
            text = await inbox.take()
            if text:
                if record.ttft_ms is None:
                    record.ttft_ms = round((time.perf_counter() - record.started) * 1000, 2)
                yield text
            if inbox.failure is not None:
                logger.error("stream %s failed: %r", record.request_id, inbox.failure)
                finished = True
                yield _stream_error_event(
                    "The engine serving this stream failed; retry the request."
                )
                return
            if inbox.ended:
                finished = True
                await reading  # the tail with the token counts, right behind a linked END
                return
    finally:
        if not finished:
            replies.cancel()
        reading.cancel()
        on_close()


async def _read_replies(replies: Replies, record: RequestRecord, inbox: Inbox) -> None:
    """The Ray side of a stream: text items (when not linked) and the tail into `inbox`; the
    reply's failure (the engine or its replica died) fails the inbox."""
    try:
        async for item in replies:
            if isinstance(item, str):
                inbox.put(item)
            elif isinstance(item, ReplyTail):
                record.prompt_tokens = item.prompt_tokens
                record.completion_tokens = item.completion_tokens
                record.transport = "link" if item.linked else "ray"
                if item.linked and not await inbox.wait_closed(LINK_END_GRACE_S):
                    inbox.fail(LinkLost("the token link lost the end of the stream"))
        inbox.end()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the engine side ends the stream
        inbox.fail(exc)


class BodyRejected(Exception):
    def __init__(self, response: Response):
        self.response = response


async def read_body(request: Request, limits: RequestLimits) -> bytes:
    """The body, bounded in size and in the time the client takes to send it (a client that
    announces more than it sends must not hold a connection for minutes)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise BodyRejected(too_large(limits.max_body_bytes))

    async def receive_all() -> bytes:
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limits.max_body_bytes:
                raise BodyRejected(too_large(limits.max_body_bytes))
            parts.append(part)
        return b"".join(parts)

    try:
        return await asyncio.wait_for(receive_all(), timeout=limits.body_timeout_s)
    except TimeoutError:
        raise BodyRejected(
            error_response(HTTPStatus.REQUEST_TIMEOUT, "The request body was not received in time.")
        ) from None


async def serve_readiness(engine_deployment: str = "Engine") -> tuple[bool, dict[str, Any]]:
    """Ready when at least one engine replica runs; each deployment's status as Serve sees it."""
    app_name = serve.get_replica_context().app_name
    status = await asyncio.to_thread(serve.status)
    app = status.applications.get(app_name)
    if app is None:
        return False, {}
    deployments = {
        name: {
            "status": str(getattr(d.status, "value", d.status)),
            "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()},
        }
        for name, d in app.deployments.items()
    }
    engine = app.deployments.get(engine_deployment)
    running = engine.replica_states.get("RUNNING", 0) if engine is not None else 0
    return running > 0, deployments


def build_api(
    engine: EngineClient,
    tenancy: Tenancy,
    retry_after_s: int,
    limits: RequestLimits | None = None,
    readiness: Readiness | None = None,
    on_request_done: Callable[[RequestRecord], None] | None = None,
    fleet: FleetWatch | None = None,
    quotas=None,
    admin: APIRouter | None = None,
    token_sink: TokenSink | None = None,
) -> FastAPI:
    """`quotas`: the Quotas deployment's handle (rate limits; None: not enforced); `admin`: the
    admin API's routes (app/admin_api.py), mounted when an admin key is configured;
    `token_sink`: where engines send streams' text (app/token_link.py; None: through Ray)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList
    from vllm.exceptions import VLLMValidationError

    protocols = {"chat": ChatCompletionRequest, "completion": CompletionRequest}
    limits = limits or RequestLimits()
    # No public schema or docs pages: the API is OpenAI's, documented there and in the README.
    api = FastAPI(title="moelora-serve", docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(api)

    def request_done(record: RequestRecord) -> None:
        if record.quota_ticket is not None and quotas is not None:
            tokens = (record.prompt_tokens or 0) + (record.completion_tokens or 0)
            quotas.finish.remote(record.quota_ticket, tokens)
        if on_request_done is not None:
            on_request_done(record)

    api.add_middleware(AccessLogMiddleware, on_done=request_done)
    if admin is not None:
        api.include_router(admin)

    def caller_of(request: Request) -> Caller:
        caller = tenancy.authenticate(request.headers.getlist("authorization"), request.headers)
        request.state.record.tenant = caller.name
        return caller

    @api.get("/health")
    async def health() -> Response:
        """Liveness: this ingress replica answers."""
        return Response(status_code=200)

    @api.get("/ready")
    async def ready() -> Response:
        """Readiness: an engine can serve. 503 (with each deployment's state) until then."""
        is_ready, deployments = await readiness() if readiness else (True, {})
        body = {"ready": is_ready, "deployments": deployments}
        headers = None if is_ready else {"Retry-After": str(retry_after_s)}
        return JSONResponse(body, status_code=200 if is_ready else 503, headers=headers)

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            caller = caller_of(request)
        except Refused as refused:
            return refusal_response(refused)
        base = tenancy.base_model
        cards = [ModelCard(id=base, root=base, owned_by="moelora-serve")]
        for a in tenancy.visible(caller):
            owner = "shared" if a.owner is None else caller.name
            cards.append(ModelCard(id=a.name, root=a.name, parent=base, owned_by=owner))
        return JSONResponse(ModelList(data=cards).model_dump())

    async def generate(endpoint: Endpoint, http_request: Request) -> Response:
        record: RequestRecord = http_request.state.record
        try:
            caller = caller_of(http_request)
        except Refused as refused:
            return refusal_response(refused)
        try:
            body = json.loads(await read_body(http_request, limits))
        except BodyRejected as rejected:
            return rejected.response
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            return bad_request(f"Invalid JSON body: {echo(exc)}")
        except RecursionError:
            return bad_request("Invalid JSON body: nested too deeply.")
        if not isinstance(body, dict):
            return bad_request("The body must be a JSON object.")
        try:
            check_fields(endpoint, body)
            request = protocols[endpoint].model_validate(body)
            if endpoint == "chat":
                request.messages = materialized(request.messages)
            check_limits(request, limits)
        except PolicyViolation as exc:
            return bad_request(exc.message, exc.param)
        except ValidationError as exc:
            return bad_request(_validation_message(exc))
        except (VLLMValidationError, ValueError) as exc:  # vLLM's own validators
            return bad_request(echo(exc), getattr(exc, "parameter", None))
        except TypeError as exc:
            # Some of vLLM's model validators assume a field's type before pydantic has
            # checked it (e.g. a system message whose content is a number): still bad input.
            return bad_request(f"Invalid request: {echo(exc)}")
        if endpoint == "chat" and not request.messages:
            return bad_request("messages must not be empty.", "messages")
        if request.model is None:
            return bad_request("model is required.", "model")
        request.cache_salt = tenant_cache_salt(caller.name, request.cache_salt)
        try:
            adapter = tenancy.resolve(caller, request.model)
        except Refused:
            return model_not_found(request.model)
        record.model, record.stream = request.model, bool(request.stream)
        ceiling = check_request_limits(
            caller.limits,
            max_tokens=getattr(request, "max_completion_tokens", None) or request.max_tokens,
            n=request.n,
            prompt_chars=prompt_chars(request),
            model=request.model,
        )
        if ceiling is not None:
            return error_response(403 if "allowed_models" in ceiling else 400, ceiling)
        if request.max_tokens is None and caller.limits.max_tokens is not None:
            request.max_tokens = caller.limits.max_tokens
        if caller.rate_limited and quotas is not None:
            admission = await quotas.admit.remote(caller.name, caller.limits)
            if not admission.admitted:
                return rate_limited(admission)
            record.quota_ticket = admission.ticket

        context = caller.context(adapter)
        reply_to, inbox = None, Inbox()
        if request.stream and token_sink is not None:
            reply_to, inbox = token_sink.open()
            context = dataclasses.replace(context, reply_to=reply_to)

        def forget_stream() -> None:
            if reply_to is not None:
                token_sink.close(reply_to.stream_id)

        try:
            accepted, head, replies = await dispatch(
                engine,
                endpoint,
                request,
                context,
                accept_timeout_s=limits.accept_timeout_s,
                attempts=limits.dispatch_attempts,
                fleet=fleet,
                request_id=record.request_id,
            )
        except NoEngine as exc:
            forget_stream()
            logger.warning("request %s not served: %s", record.request_id, exc)
            return service_unavailable(retry_after_s)
        except BaseException:
            forget_stream()
            raise
        record.replica = accepted.replica_id
        headers = {SERVED_BY_HEADER: accepted.replica_id}
        if head.kind is ReplyKind.STREAM:
            return StreamingResponse(
                relay(replies, record, inbox, forget_stream),
                media_type="text/event-stream",
                headers=headers,
            )
        forget_stream()
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

    async def __init__(
        self,
        engine,
        registry,
        quotas,
        base_model: str,
        retry_after_s: int,
        limits: RequestLimits,
        admin_key_digests: list[str],
        gateway: GatewayTrust | None = None,
        token_link: bool = True,
        engine_calls: str = "grpc",
    ):
        reset_niceness()
        sink = None
        if token_link:
            sink = TokenSink()
            # The node's address, where engine replicas on other nodes reach it too.
            await sink.start(ray.util.get_node_ip_address())
        metrics = RequestMetrics()
        view = TenantView(registry, await registry.snapshot.remote())
        view.start()
        engines = EngineClient(engine, over_grpc=engine_calls == "grpc")
        admin = None
        if admin_key_digests:
            admin = build_admin_router(
                registry, engines.validate_adapter, view, admin_key_digests, base_model
            )
        self._api = build_api(
            engines,
            Tenancy(view, base_model, gateway),
            retry_after_s,
            limits,
            serve_readiness,
            metrics.observe,
            FleetWatch(serve_readiness, routable=lambda: routable_replicas(engine.deployment_name)),
            quotas,
            admin,
            sink,
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._api
