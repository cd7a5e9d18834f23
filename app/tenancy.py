"""Who is calling and what they may run: the ingress's tenant gate, over the registry snapshot.

For each generation request, in order:
  1. the API key (`Authorization: Bearer <key>`) -> tenant: 401 if unknown, 403 if disabled.
     Keys are held only as sha256 digests (app/registry.py); the clear key exists only in the
     request being checked and is never logged;
  2. `model` -> the base model, the tenant's own adapter of that name, else a shared adapter of
     that name (404 otherwise: another tenant's adapter is answered exactly like a name that
     does not exist, so nobody learns what others have);
  3. the tenant's per-request ceilings (max_tokens, n, prompt length, allowed models: 400/403);
  4. its rates (requests/s, tokens/min, concurrency): one call to the Quotas replica shared by
     every ingress replica (app/quota_service.py), only for tenants that have a rate limit;
     429 + Retry-After naming the limit.
Nothing else in a request (headers, body) identifies a tenant or sets its share.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Protocol

from app.contract import AdapterRef, RequestContext
from app.quotas import Admission, TenantLimits
from app.registry import AdapterRecord, Snapshot, TenantRecord

PRIORITY_CLASSES = {"interactive": 0, "batch": 1}


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class SnapshotSource(Protocol):
    snapshot: Snapshot


@dataclass(frozen=True)
class Caller:
    tenant: TenantRecord
    limits: TenantLimits

    @property
    def name(self) -> str:
        return self.tenant.name

    @property
    def rate_limited(self) -> bool:
        lim = self.limits
        return any(
            v is not None for v in (lim.requests_per_s, lim.tokens_per_min, lim.max_concurrent)
        )

    def context(self, adapter: AdapterRecord | None) -> RequestContext:
        ref = None
        if adapter:
            ref = AdapterRef(adapter.engine_name, adapter.uri, adapter.sha256, adapter.lineage)
        return RequestContext(
            adapter=ref,
            tenant=self.tenant.name,
            weight=self.tenant.weight,
            priority=PRIORITY_CLASSES.get(self.tenant.priority, 0),
            pinned=self.tenant.pinned,
        )


class Refused(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass(frozen=True)
class GatewayTrust:
    """Behind an authenticating gateway, the tenant may come as a header (`tenant_header`),
    trusted only on requests that also carry the gateway's shared secret (`secret_header`),
    configured as its sha256 digest. Off unless configured."""

    tenant_header: str
    secret_header: str
    secret_sha256: str

    def tenant_of(self, headers) -> str | None:
        secrets_sent = headers.getlist(self.secret_header)
        names = headers.getlist(self.tenant_header)
        if len(secrets_sent) != 1 or len(names) != 1:
            return None
        digest = hash_api_key(secrets_sent[0])
        return names[0] if hmac.compare_digest(digest, self.secret_sha256) else None


class Tenancy:
    def __init__(self, view: SnapshotSource, base_model: str, gateway: GatewayTrust | None = None):
        self.view = view
        self.base_model = base_model
        self.gateway = gateway
        self._limits: dict[tuple[int, str], TenantLimits] = {}

    def authenticate(self, authorization: list[str], headers=None) -> Caller:
        """The caller of a request with these Authorization header values (or, with a trusted
        gateway configured, its tenant header), or Refused. Two Authorization headers are
        refused, not resolved: which one a proxy in front keeps is not ours to guess."""
        snapshot = self.view.snapshot
        tenant = None
        if self.gateway is not None and headers is not None:
            name = self.gateway.tenant_of(headers)
            if name is not None:
                tenant = snapshot.tenants.get(name)
                if tenant is None:
                    raise Refused(401, "Unknown tenant.")
        if tenant is None and len(authorization) == 1:
            scheme, _, key = authorization[0].partition(" ")
            key = key.strip()
            if scheme.lower() == "bearer" and key:
                # A dict lookup on the digest: comparing digests of a secret leaks nothing useful.
                name = snapshot.tenant_by_key_digest.get(hash_api_key(key))
                tenant = snapshot.tenants.get(name) if name else None
        if tenant is None:
            raise Refused(401, "Invalid API key.")
        if tenant.disabled:
            raise Refused(403, "This tenant is disabled.")
        return Caller(tenant, self._limits_of(snapshot.generation, tenant))

    def _limits_of(self, generation: int, tenant: TenantRecord) -> TenantLimits:
        key = (generation, tenant.name)
        limits = self._limits.get(key)
        if limits is None:
            if len(self._limits) > 10_000:
                self._limits.clear()
            limits = self._limits[key] = TenantLimits.model_validate(dict(tenant.limits))
        return limits

    def resolve(self, caller: Caller, model: str) -> AdapterRecord | None:
        """The adapter version to run for `model` (None: the base model), or Refused 404."""
        if model == self.base_model:
            return None
        adapter = self.view.snapshot.resolve(caller.name, model)
        if adapter is None:
            raise Refused(404, "", "model")  # the ingress builds the not-found body
        return adapter

    def visible(self, caller: Caller) -> list[AdapterRecord]:
        return self.view.snapshot.adapters_visible_to(caller.name)


def refusal_for(admission: Admission) -> Refused:
    return Refused(
        429, f"Rate limit reached for this tenant (limit {admission.limit}).", admission.limit
    )
