"""Tenants, keys and adapters for one load-test run, created and removed through the admin API
(`/admin/v1`, docs/tenancy.md).

Each tenant gets one key and one adapter named `chat`, registered from the files of one of the
built-in model's demo adapters (round robin by rank): an absolute directory on this machine
(`path`, the default: the server must run here, as scripts/serve.sh does), `builtin:<name>`
(`builtin`), or an S3 prefix template such as `s3://adapters/{adapter}` (the demo adapter's name
substituted). Every tenant's adapter is its own engine adapter (`<tenant>/chat/v1`) even when the
files are the same, so N tenants load N adapters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import requests

from app.builtin_model import DEMO_ADAPTERS, ensure_builtin_model

ADAPTER_NAME = "chat"


@dataclass
class RunTenant:
    name: str
    rank: int  # 1 = most popular
    probability: float
    adapter_source: str
    key: str = ""  # kept in memory only, never written to the run directory

    def public(self) -> dict:
        return {
            "name": self.name,
            "rank": self.rank,
            "probability": round(self.probability, 6),
            "adapter": ADAPTER_NAME,
            "adapter_source": self.adapter_source,
        }


def adapter_uri(source: str, rank: int) -> str:
    demo = DEMO_ADAPTERS[(rank - 1) % len(DEMO_ADAPTERS)].name
    if source == "path":
        return str(ensure_builtin_model().adapter(demo))
    if source == "builtin":
        return f"builtin:{demo}"
    if "{adapter}" in source:
        return source.format(adapter=demo)
    raise ValueError(f"adapter source {source!r}: path, builtin, or a URI with {{adapter}} in it")


class Admin:
    def __init__(self, host: str, admin_key: str, timeout: float = 120):
        self.base = host.rstrip("/") + "/admin/v1"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {admin_key}"
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict | None = None, ok=(200, 201)) -> dict:
        resp = self.session.request(method, self.base + path, json=body, timeout=self.timeout)
        if resp.status_code not in ok:
            raise RuntimeError(f"admin {method} {path}: {resp.status_code} {resp.text[:300]}")
        return resp.json()

    def tenant_names(self) -> set[str]:
        return {t["name"] for t in self.call("GET", "/tenants")}

    def create(self, tenant: RunTenant) -> None:
        self.call("POST", "/tenants", {"name": tenant.name})
        tenant.key = self.call("POST", f"/tenants/{tenant.name}/keys", {"label": "loadtest"})["key"]
        self.call(
            "PUT", f"/tenants/{tenant.name}/adapters/{ADAPTER_NAME}", {"uri": tenant.adapter_source}
        )

    def delete(self, name: str) -> bool:
        """True when it was there."""
        resp = self.session.delete(f"{self.base}/tenants/{name}", timeout=self.timeout)
        if resp.status_code not in (200, 404):
            raise RuntimeError(f"admin DELETE /tenants/{name}: {resp.status_code} {resp.text}")
        return resp.status_code == 200


def provision(admin: Admin, tenants: list[RunTenant]) -> float:
    """Creates every tenant, its key and adapter; on any failure removes what it created and
    raises. Returns the seconds it took."""
    started = time.monotonic()
    created: list[str] = []
    try:
        for tenant in tenants:
            created.append(tenant.name)
            admin.create(tenant)
    except BaseException:
        remove(admin, created)
        raise
    return time.monotonic() - started


def remove(admin: Admin, names: list[str]) -> list[str]:
    """Deletes the tenants (their keys and adapters go with them); returns those that failed."""
    failed = []
    for name in names:
        try:
            admin.delete(name)
        except Exception:  # noqa: BLE001 - try the others, report this one
            failed.append(name)
    return failed
