"""The adapter catalogue as the ingress sees it: which model names a tenant may use.

A tenant may use the base model, its own adapters and shared adapters. An adapter of another
tenant is answered exactly like a name that does not exist, so nobody can learn what other
tenants have. The catalogue holds names and ownership only; paths are the engine's business.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from app.config import AdapterConfig
from app.tenants import Tenant


class ModelNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Adapter:
    name: str
    owner: str | None
    shared: bool

    def usable_by(self, tenant: Tenant) -> bool:
        return self.shared or self.owner == tenant.name


class AdapterCatalog:
    def __init__(self, base_model: str, adapters: Iterable[AdapterConfig]):
        self.base_model = base_model
        self._adapters = {a.name: Adapter(a.name, a.owner, a.shared) for a in adapters}

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def resolve(self, model: str, tenant: Tenant) -> str | None:
        """The adapter to run for `model` (None: the base model), or ModelNotFound."""
        if model == self.base_model:
            return None
        adapter = self._adapters.get(model)
        if adapter is None or not adapter.usable_by(tenant):
            raise ModelNotFound(model)
        return adapter.name

    def visible_to(self, tenant: Tenant) -> list[Adapter]:
        return [a for a in self._adapters.values() if a.usable_by(tenant)]
