"""A registered adapter version as a validated directory on this node (engine side).

The registry names each adapter version by where its files are (`uri`: s3://..., an absolute
directory, or `builtin:<name>`) and, once validated at registration, by the digest of its
bytes. An engine replica that must serve a version fetches it into the node's disk cache
(app/adapter_store.py), validates it against the base model it runs (app/adapter_validation.py:
never unpickled, shapes, ranks, finite values) and checks the digest: what vLLM loads is exactly
what was validated, even if the object store's copy changed since. Validation at registration
also runs here, on an engine replica, because only engine nodes are sure to have the model.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from app.adapter_store import AdapterStore, ObjectStoreConfig
from app.adapter_validation import (
    AdapterRejected,
    LoraTargets,
    ValidatedAdapter,
    validate_adapter_dir,
)
from app.builtin_model import cache_root
from app.model_files import resolve_adapter_path


class AdapterStorageConfig(BaseModel):
    """Where engines keep fetched adapters (config `adapter_storage`)."""

    model_config = ConfigDict(extra="forbid")

    cache_dir: str | None = None  # default: <the built-in model's cache root>/adapters
    cache_max_bytes: int = Field(default=20 * 2**30, gt=0)
    max_adapter_bytes: int = Field(default=2 * 2**30, gt=0)
    object_store: ObjectStoreConfig = Field(default_factory=ObjectStoreConfig)


class AdapterFiles:
    def __init__(self, model_dir: str, max_rank: int, storage: AdapterStorageConfig):
        self.model_dir = model_dir
        self.max_rank = max_rank
        self.max_adapter_bytes = storage.max_adapter_bytes
        cache_dir = Path(storage.cache_dir) if storage.cache_dir else cache_root() / "adapters"
        self.store = AdapterStore(
            cache_dir,
            storage.cache_max_bytes,
            storage.object_store,
            max_adapter_bytes=storage.max_adapter_bytes,
        )

    @cached_property
    def targets(self) -> LoraTargets:
        return LoraTargets.from_model_dir(Path(self.model_dir))

    def validated(self, uri: str) -> tuple[Path, ValidatedAdapter]:
        """Fetch and validate (blocking: call it in a thread). Raises AdapterFetchError or
        AdapterRejected, both naming the problem."""
        path = self.store.fetch(resolve_adapter_path(uri))
        return path, validate_adapter_dir(
            path, self.targets, max_rank=self.max_rank, max_bytes=self.max_adapter_bytes
        )

    def local_copy(self, uri: str, sha256: str) -> Path:
        """The directory vLLM loads for a registered version; `sha256` empty: not pinned (an
        adapter declared in the config, validated here for the first time)."""
        path, adapter = self.validated(uri)
        if sha256 and adapter.sha256 != sha256:
            raise AdapterRejected(
                f"the files at {uri} changed since the adapter was registered "
                f"(sha256 {adapter.sha256[:12]}…, registered {sha256[:12]}…)"
            )
        return path
