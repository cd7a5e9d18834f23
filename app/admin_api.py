"""The admin API: tenants, their keys, limits and adapters, changed at run time.

Mounted under /admin/v1 on the ingress, behind its own credential (config `admin.api_key_sha256`;
a tenant key never opens it, and without a configured admin key the routes do not exist).
Every change goes to the Registry replica (app/registry_service.py), which persists it and tells
every ingress replica; this ingress waits until its own view has the change before answering,
so the admin's next request already sees it. Errors are OpenAI-shaped, like the rest of the API.

    POST   /admin/v1/tenants                         {name, weight?, priority?, limits?, pinned?}
    GET    /admin/v1/tenants   |   GET/PATCH/DELETE /admin/v1/tenants/{tenant}
    POST   /admin/v1/tenants/{tenant}/keys            {label?} -> the new key, shown once
    GET    /admin/v1/tenants/{tenant}/keys   |   DELETE /admin/v1/tenants/{tenant}/keys/{key_id}
    GET    /admin/v1/tenants/{tenant}/adapters
    PUT    /admin/v1/tenants/{tenant}/adapters/{name} {uri}: register or replace (a new version)
    DELETE /admin/v1/tenants/{tenant}/adapters/{name}
    PUT/DELETE /admin/v1/shared/adapters/{name}       the same for adapters every tenant may use

An adapter is fetched and validated on an engine replica (where the base model is) before the
registry records it; a rejected adapter changes nothing and the error names the problem.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.config import NAME_PATTERN
from app.logs import get_logger
from app.openai_errors import error_response
from app.quotas import TenantLimits
from app.registry import Conflict, Invalid, NotFound, RegistryError
from app.tenancy import hash_api_key

logger = get_logger("admin")


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    weight: float = Field(default=1.0, gt=0)
    priority: Literal["interactive", "batch"] = "interactive"
    limits: TenantLimits = Field(default_factory=TenantLimits)
    pinned: bool = False


class TenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float | None = Field(default=None, gt=0)
    priority: Literal["interactive", "batch"] | None = None
    limits: TenantLimits | None = None
    disabled: bool | None = None
    pinned: bool | None = None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = Field(default="", max_length=64)


class AdapterPut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uri: str = Field(min_length=1, max_length=2048)


_STATUS = {NotFound: HTTPStatus.NOT_FOUND, Conflict: HTTPStatus.CONFLICT, Invalid: 400}


def _registry_error(exc: RegistryError) -> Response:
    status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 400)
    return error_response(status, str(exc))


def _json(obj: Any, status: int = 200) -> Response:
    if hasattr(obj, "to_dict"):  # registry records
        obj = obj.to_dict()
    return JSONResponse(json.loads(json.dumps(obj, default=str)), status_code=status)


def _adapter_json(record) -> dict:
    return {**record.to_dict(), "engine_name": record.engine_name}


def build_admin_router(
    registry, validate_adapter, view, admin_key_digests: Iterable[str], base_model: str
) -> APIRouter:
    """`registry`: the Registry deployment's handle; `validate_adapter(uri)`: awaitable that
    fetches and validates on an engine replica; `view`: this ingress's TenantView."""
    digests = list(admin_key_digests)
    router = APIRouter(prefix="/admin/v1")

    def authorized(request: Request) -> bool:
        values = request.headers.getlist("authorization")
        if len(values) != 1:
            return False
        scheme, _, key = values[0].partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        digest = hash_api_key(key.strip())
        return any(hmac.compare_digest(digest, d) for d in digests)

    async def body_of(request: Request, model: type[BaseModel]):
        try:
            return model.model_validate_json(await request.body() or b"{}")
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(x) for x in first.get("loc", ())) or "body"
            raise _Rejected(error_response(400, f"{loc}: {first.get('msg')}")) from None

    async def apply(operation: str, *args, **kwargs):
        outcome = await registry.apply.remote(operation, *args, **kwargs)
        if isinstance(outcome, RegistryError):
            raise _Rejected(_registry_error(outcome))
        result, generation = outcome
        await view.wait_for(generation)
        return result

    def route(method: str, path: str, status: int = 200):
        """An admin endpoint: credential checked first, registry errors mapped to 4xx."""

        def register(handler):
            async def endpoint(request: Request) -> Response:
                request.state.record.tenant = "(admin)"
                if not authorized(request):
                    return error_response(401, "A valid admin API key is required.")
                try:
                    return _json(await handler(request, **request.path_params), status)
                except _Rejected as rejected:
                    return rejected.response

            router.add_api_route(path, endpoint, methods=[method])
            return handler

        return register

    @route("POST", "/tenants", 201)
    async def create_tenant(request: Request):
        body = await body_of(request, TenantCreate)
        return await apply(
            "create_tenant",
            body.name,
            weight=body.weight,
            priority=body.priority,
            limits=body.limits.model_dump(exclude_none=True),
            pinned=body.pinned,
        )

    @route("GET", "/tenants")
    async def list_tenants(request: Request):
        return [t.to_dict() for t in view.snapshot.tenants.values()]

    @route("GET", "/tenants/{tenant}")
    async def get_tenant(request: Request, tenant: str):
        record = view.snapshot.tenants.get(tenant)
        if record is None:
            raise _Rejected(error_response(404, f"No tenant named {tenant!r}."))
        return record

    @route("PATCH", "/tenants/{tenant}")
    async def update_tenant(request: Request, tenant: str):
        body = await body_of(request, TenantUpdate)
        changes = body.model_dump(exclude_none=True)
        if body.limits is not None:
            changes["limits"] = body.limits.model_dump(exclude_none=True)
        return await apply("update_tenant", tenant, **changes)

    @route("DELETE", "/tenants/{tenant}")
    async def delete_tenant(request: Request, tenant: str):
        await apply("delete_tenant", tenant)
        return {"deleted": tenant}

    @route("POST", "/tenants/{tenant}/keys", 201)
    async def create_key(request: Request, tenant: str):
        body = await body_of(request, KeyCreate)
        key = f"sk-{secrets.token_urlsafe(32)}"
        key_id = await apply("add_key", tenant, hash_api_key(key), body.label)
        # The only time the key exists outside the client: it is stored as a digest.
        return {"id": key_id, "key": key, "label": body.label}

    @route("GET", "/tenants/{tenant}/keys")
    async def list_keys(request: Request, tenant: str):
        return await apply("list_keys", tenant)

    @route("DELETE", "/tenants/{tenant}/keys/{key_id}")
    async def revoke_key(request: Request, tenant: str, key_id: str):
        await apply("revoke_key", tenant, key_id)
        return {"revoked": key_id}

    @route("GET", "/tenants/{tenant}/adapters")
    async def list_adapters(request: Request, tenant: str):
        if tenant not in view.snapshot.tenants:
            raise _Rejected(error_response(404, f"No tenant named {tenant!r}."))
        return [_adapter_json(a) for a in view.snapshot.adapters_visible_to(tenant)]

    async def put_adapter(request: Request, owner: str | None, name: str):
        body = await body_of(request, AdapterPut)
        if name == base_model:
            raise _Rejected(error_response(400, f"{name!r} is the base model's name."))
        if owner is not None and owner not in view.snapshot.tenants:
            raise _Rejected(error_response(404, f"No tenant named {owner!r}."))
        checked = await validate_adapter(body.uri)
        if "error" in checked:
            raise _Rejected(error_response(400, f"Adapter rejected: {checked['error']}"))
        record = await apply(
            "put_adapter",
            owner,
            name,
            uri=body.uri,
            sha256=checked["sha256"],
            rank=checked["rank"],
            size_bytes=checked["size_bytes"],
        )
        logger.info("adapter %s registered (%s)", record.engine_name, body.uri)
        return _adapter_json(record)

    @route("PUT", "/tenants/{tenant}/adapters/{name}")
    async def put_tenant_adapter(request: Request, tenant: str, name: str):
        return await put_adapter(request, tenant, name)

    @route("PUT", "/shared/adapters/{name}")
    async def put_shared_adapter(request: Request, name: str):
        return await put_adapter(request, None, name)

    @route("DELETE", "/tenants/{tenant}/adapters/{name}")
    async def delete_tenant_adapter(request: Request, tenant: str, name: str):
        return _adapter_json(await apply("delete_adapter", tenant, name))

    @route("DELETE", "/shared/adapters/{name}")
    async def delete_shared_adapter(request: Request, name: str):
        return _adapter_json(await apply("delete_adapter", None, name))

    return router


class _Rejected(Exception):
    def __init__(self, response: Response):
        self.response = response
