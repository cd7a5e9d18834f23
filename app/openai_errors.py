"""Every error the ingress answers, in the OpenAI error shape vLLM also uses:

    {"error": {"message": str, "type": str, "param": str | null, "code": int}}

including FastAPI's own (unknown route, wrong method) and any exception nobody expected, which
becomes a 500 that names the request id and nothing else about the failure.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# Names taken from a request are echoed back at most this long (a 100 kB model name is not
# worth returning) and only as printable text.
MAX_ECHO_CHARS = 128

_TYPE_BY_STATUS = {
    HTTPStatus.BAD_REQUEST: "BadRequestError",
    HTTPStatus.UNAUTHORIZED: "AuthenticationError",
    HTTPStatus.FORBIDDEN: "PermissionDeniedError",
    HTTPStatus.NOT_FOUND: "NotFoundError",
    HTTPStatus.METHOD_NOT_ALLOWED: "MethodNotAllowedError",
    HTTPStatus.REQUEST_TIMEOUT: "RequestTimeoutError",
    HTTPStatus.CONFLICT: "ConflictError",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "RequestTooLargeError",
    HTTPStatus.UNPROCESSABLE_ENTITY: "BadRequestError",
    HTTPStatus.TOO_MANY_REQUESTS: "RateLimitError",
    HTTPStatus.INTERNAL_SERVER_ERROR: "InternalServerError",
    HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
}


def echo(text: object) -> str:
    """A client-supplied name made safe to put in a message: printable, bounded."""
    s = str(text).encode("utf-8", "replace").decode("utf-8")
    s = "".join(c if c.isprintable() else "?" for c in s[:MAX_ECHO_CHARS])
    return s + "…" if len(str(text)) > MAX_ECHO_CHARS else s


def error_body(status: HTTPStatus | int, message: str, param: str | None = None) -> dict:
    status = HTTPStatus(status)
    err_type = _TYPE_BY_STATUS.get(status, "Error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": status.value}}


def error_response(
    status: HTTPStatus | int,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    status = HTTPStatus(status)
    return JSONResponse(
        error_body(status, message, param), status_code=status.value, headers=headers
    )


def bad_request(message: str, param: str | None = None) -> JSONResponse:
    return error_response(HTTPStatus.BAD_REQUEST, message, param)


def unauthorized() -> JSONResponse:
    return error_response(
        HTTPStatus.UNAUTHORIZED,
        "Invalid or missing API key. Pass it as 'Authorization: Bearer <key>'.",
        headers={"WWW-Authenticate": "Bearer"},
    )


def model_not_found(model: object) -> JSONResponse:
    # Same text for unknown names and other tenants' adapters: no existence oracle.
    return error_response(
        HTTPStatus.NOT_FOUND, f"The model `{echo(model)}` does not exist.", "model"
    )


def service_unavailable(retry_after_s: int) -> JSONResponse:
    return error_response(
        HTTPStatus.SERVICE_UNAVAILABLE,
        "No engine can take the request now. Retry after a short wait.",
        headers={"Retry-After": str(retry_after_s)},
    )


def too_large(max_bytes: int) -> JSONResponse:
    return error_response(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"The request body exceeds {max_bytes} bytes."
    )


def install_handlers(api: FastAPI) -> None:
    """FastAPI's own errors and every unexpected exception, in the OpenAI shape."""

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = HTTPStatus(exc.status_code)
        message = {
            HTTPStatus.NOT_FOUND: f"No route {echo(request.url.path)}.",
            HTTPStatus.METHOD_NOT_ALLOWED: f"Method {request.method} is not allowed here.",
        }.get(status, status.phrase)
        return error_response(status, message, headers=getattr(exc, "headers", None))

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return bad_request(str(exc.errors()[:3]))

    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)


def internal_error(request_id: str) -> JSONResponse:
    """The answer to an exception nobody expected (app/request_log.py catches it): the client
    gets the request id to quote, the log gets the traceback."""
    return error_response(
        HTTPStatus.INTERNAL_SERVER_ERROR,
        f"The server failed to handle the request (request id {request_id}).",
    )
