"""Tenant identity from the API key (`Authorization: Bearer <key>`).

Keys are configured and held only as sha256 digests; the clear key exists only in the request
being checked and is never logged. Nothing else in a request (headers, body) identifies a tenant.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from app.config import TenantConfig


@dataclass(frozen=True)
class Tenant:
    name: str


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TenantDirectory:
    def __init__(self, tenants: list[TenantConfig]):
        self._by_digest = {d: Tenant(t.name) for t in tenants for d in t.api_key_sha256}

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant whose key is in the Authorization header, or None."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        # A dict lookup on the digest: comparing digests of a secret leaks nothing useful.
        return self._by_digest.get(hash_api_key(key))
