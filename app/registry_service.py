"""The registry as a Ray Serve deployment, and the ingress's live view of it.

One `Registry` replica owns the SQLite file (app/registry.py): it survives restarts of any other
replica, and a restarted Registry replica reopens the same file. It seeds the tenants and
adapters declared in the config at start-up, applies admin changes, and answers `watch` long
polls: every ingress replica holds the current `Snapshot` in memory (`TenantView`), refreshed
the moment a change commits, so authentication and model resolution never leave the process.

Multi-node: the Registry replica runs where Ray places it; every node reaches it through its
handle, and adapters themselves come from the object store (app/adapter_store.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ray import serve

from app.config import AdapterConfig, TenantConfig
from app.logs import get_logger
from app.registry import Registry, RegistryError, Snapshot

logger = get_logger("registry")

WATCH_TIMEOUT_S = 30.0
# Registry methods the admin API may call through `apply`.
ADMIN_OPERATIONS = frozenset(
    {
        "create_tenant",
        "update_tenant",
        "delete_tenant",
        "add_key",
        "revoke_key",
        "list_keys",
        "put_adapter",
        "delete_adapter",
    }
)


@serve.deployment(name="Registry", num_replicas=1, max_ongoing_requests=100_000)
class RegistryService:
    def __init__(
        self,
        path: str,
        tenants: list[TenantConfig],
        adapters: list[AdapterConfig],
        reserved_names: tuple[str, ...] = (),
    ):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.registry = Registry(Path(path), reserved_names=reserved_names)
        # Config adapters are not pinned to a digest: engines validate them when they load them.
        self.registry.seed(tenants, adapters, lambda adapter: ("", 0, 0))
        # A config tenant's share and limits are the config's at every start (changes made
        # through the admin API last until then).
        for t in tenants:
            self.registry.update_tenant(
                t.name,
                weight=t.weight,
                priority=t.priority,
                limits=t.limits.model_dump(exclude_none=True),
            )
        self._changed = asyncio.Condition()
        logger.info("registry at %s, generation %d", path, self.registry.generation)

    async def snapshot(self) -> Snapshot:
        return self.registry.snapshot()

    async def watch(self, generation: int, timeout_s: float = WATCH_TIMEOUT_S) -> Snapshot:
        """The snapshot as soon as it differs from `generation` (or after `timeout_s`)."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.registry.generation != generation),
                    timeout_s,
                )
            except TimeoutError:
                pass
        return self.registry.snapshot()

    async def apply(self, operation: str, *args, **kwargs) -> tuple[Any, int] | RegistryError:
        """Run one admin operation: (its result, the generation it produced), or the
        RegistryError it raised (returned, not raised, so the caller gets it intact)."""
        if operation not in ADMIN_OPERATIONS:
            raise ValueError(f"unknown registry operation {operation!r}")
        try:
            result = getattr(self.registry, operation)(*args, **kwargs)
        except RegistryError as exc:
            return exc
        async with self._changed:
            self._changed.notify_all()
        return result, self.registry.generation


class TenantView:
    """An ingress replica's current registry snapshot, kept fresh by a long-poll loop."""

    def __init__(self, registry, initial: Snapshot):
        self._registry = registry
        self.snapshot = initial
        self._updated = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            try:
                snapshot = await self._registry.watch.remote(self.snapshot.generation)
            except Exception:  # noqa: BLE001 - the Registry replica restarts; keep the last view
                logger.warning("registry watch failed; retrying", exc_info=True)
                await asyncio.sleep(1.0)
                continue
            if snapshot.generation != self.snapshot.generation:
                self.snapshot = snapshot
                self._updated.set()
                self._updated = asyncio.Event()

    async def wait_for(self, generation: int, timeout_s: float = 10.0) -> None:
        """Until this view has caught up with `generation` (after an admin change made here,
        so that the answer to the admin and the next request agree)."""
        self.start()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.snapshot.generation < generation:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"registry view did not reach generation {generation}")
            try:
                await asyncio.wait_for(self._updated.wait(), remaining)
            except TimeoutError:
                pass
