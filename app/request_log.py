"""Request ids and the access log: one structured line per request, written when it ends.

A pure ASGI middleware (no response buffering, so streams pass through untouched):
  * the request id is the incoming `x-request-id` when well-formed, else a new one; it is in
    `request.state.request_id`, in the log line and in 500 messages. Ray Serve's proxy already
    puts an `x-request-id` on every response (the incoming one, or one it generated), so this
    middleware adds the header only to requests that did not come through it (the proxy
    echoes a malformed client id as is; the log then uses a fresh id, and says so);
  * an exception no handler caught becomes an OpenAI-style 500 naming the request id (when the
    response has not started; a stream already under way can only be cut);
  * handlers fill `request.state.record` (tenant, model, replica, token counts) as they learn
    them; the middleware adds status and latency and logs the record as one JSON line.
Never logged: prompts, completions, API keys or any other header.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import get_logger
from app.openai_errors import internal_error

logger = get_logger("access")

REQUEST_ID_HEADER = "x-request-id"
_WELL_FORMED_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class RequestRecord:
    request_id: str
    method: str
    path: str
    status: int = 0
    tenant: str | None = None
    model: str | None = None
    replica: str | None = None
    stream: bool | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float = 0.0
    ttft_ms: float | None = None  # streams: time to the first chunk sent
    transport: str | None = None  # streams: "link" (app/token_link.py) or "ray"
    rejected_client_request_id: bool = False
    started: float = field(default_factory=time.perf_counter, repr=False)
    quota_ticket: int | None = field(default=None, repr=False)  # returned when the request ends


def incoming_request_id(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"x-request-id":
            return value.decode("latin-1")
    return None


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, on_done: Callable[[RequestRecord], None] | None = None):
        self.app = app
        self.on_done = on_done  # e.g. app.metrics.RequestMetrics.observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = incoming_request_id(scope)
        well_formed = incoming is not None and _WELL_FORMED_ID.fullmatch(incoming) is not None
        request_id = incoming if well_formed else uuid.uuid4().hex
        record = RequestRecord(request_id, scope["method"], scope["path"])
        record.rejected_client_request_id = incoming is not None and not well_formed
        state = scope.setdefault("state", {})
        state["request_id"] = record.request_id
        state["record"] = record

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                if incoming is None:
                    MutableHeaders(scope=message)[REQUEST_ID_HEADER] = record.request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unexpected error in request %s", record.request_id)
            if record.status:  # the response started: nothing else can be sent
                raise
            await internal_error(record.request_id)(scope, receive, send_with_id)
        finally:
            record.latency_ms = round((time.perf_counter() - record.started) * 1000, 2)
            fields = asdict(record)
            fields.pop("started"), fields.pop("quota_ticket")
            logger.info(json.dumps({"event": "request", **fields}))
            if self.on_done is not None:
                self.on_done(record)
