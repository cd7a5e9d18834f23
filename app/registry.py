"""The durable registry of tenants, their API keys and their adapters (SQLite, standard library).

Config (app/config.py) declares what exists at start-up; the admin API changes it at run time.
Both end up here, in one SQLite file that survives restarts. Readers take an immutable
`Snapshot`; every change bumps a persisted `generation`, so a reader knows its snapshot is stale
by comparing one integer, and an admin call can wait until every replica has reached the
generation that the call produced (generations only grow).

- Every mutation is one `BEGIN IMMEDIATE` transaction: nothing is half-done after an error, and
  writers in other processes sharing the file are serialised by SQLite itself; threads of this
  process share one connection behind one lock.
- Adapter names are per tenant; `owner=None` is an adapter shared with every tenant (stored as
  the empty string, which no tenant name can be). Versions count 1, 2, ... per (owner, name)
  and are never reused, not even after the adapter or its tenant is deleted: `engine_name` must
  never name two different sets of weights, or an engine could serve stale ones under it.
- Keys are held as sha256 digests only; an admin sees a key id (the digest's first 12 hex).
- A call that changes nothing (an update to the same values, a second `seed`) does not bump
  the generation.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from app.config import NAME_PATTERN

if TYPE_CHECKING:
    from app.config import AdapterConfig, TenantConfig

PRIORITIES = ("interactive", "batch")
SHARED_ENGINE_PREFIX = "_shared"  # cannot be a tenant name: NAME_PATTERN starts alphanumeric
KEY_ID_CHARS = 12
MAX_LABEL_CHARS = 128
MAX_URI_CHARS = 2048
SCHEMA_VERSION = 1
_SHARED = ""  # the owner column of a shared adapter (NULLs would defeat the primary key)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(NAME_PATTERN)
_S3_URI = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\x00-\x1f\x7f]*)?")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', 0);
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    weight REAL NOT NULL,
    priority TEXT NOT NULL,
    disabled INTEGER NOT NULL,
    pinned INTEGER NOT NULL,
    limits TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    digest TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
    key_id TEXT NOT NULL,
    label TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (tenant, key_id)
);
CREATE TABLE IF NOT EXISTS adapters (
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    uri TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    rank INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (owner, name)
);
-- The last version ever issued per (owner, name): it outlives deletions so versions never repeat.
CREATE TABLE IF NOT EXISTS adapter_versions (
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    last_version INTEGER NOT NULL,
    PRIMARY KEY (owner, name)
);
"""


class RegistryError(Exception):
    """A refused registry operation; the message names the problem and is safe to show an admin
    (it never contains a key digest)."""


class NotFound(RegistryError):
    pass


class Conflict(RegistryError):
    pass


class Invalid(RegistryError):
    pass


def _freeze(value: Any) -> Any:
    """Read-only JSON: snapshots are shared by every reader, so none may change another's."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class TenantRecord:
    name: str
    weight: float = 1.0
    priority: str = "interactive"  # "interactive" | "batch"
    disabled: bool = False
    pinned: bool = False
    # Opaque JSON object here (app's limits module validates it); read-only, see to_dict().
    limits: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits", _freeze(self.limits))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (json.dumps refuses the read-only mappings)."""
        return {
            "name": self.name,
            "weight": self.weight,
            "priority": self.priority,
            "disabled": self.disabled,
            "pinned": self.pinned,
            "limits": _thaw(self.limits),
        }


@dataclass(frozen=True)
class AdapterRecord:
    owner: str | None  # tenant name; None = shared with every tenant
    name: str  # tenant-local: what clients send as `model`
    version: int  # 1, 2, ... per (owner, name), never reused
    uri: str  # s3://..., an absolute directory, or builtin:<name>
    sha256: str  # content digest of the validated files
    rank: int
    size_bytes: int
    created_at: float

    @property
    def shared(self) -> bool:
        return self.owner is None

    @property
    def lineage(self) -> str:
        """The adapter across its versions, e.g. "acme/support", "_shared/assistant"."""
        return f"{self.owner or SHARED_ENGINE_PREFIX}/{self.name}"

    @property
    def engine_name(self) -> str:
        """Unique across tenants and versions, e.g. "acme/support/v3", "_shared/assistant/v1"."""
        return f"{self.lineage}/v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "name": self.name,
            "version": self.version,
            "engine_name": self.engine_name,
            "uri": self.uri,
            "sha256": self.sha256,
            "rank": self.rank,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class Snapshot:
    """Everything at one generation; immutable, so readers need no lock."""

    generation: int
    tenants: Mapping[str, TenantRecord]
    tenant_by_key_digest: Mapping[str, str]  # sha256 hex of an API key -> tenant name
    adapters: Mapping[tuple[str | None, str], AdapterRecord]  # (owner, name) -> current version

    def authenticate(self, digest: str) -> TenantRecord | None:
        """The tenant of this key digest if it exists and is not disabled, else None.
        (`tenant_by_key_digest` holds disabled tenants' keys too.)"""
        tenant = self.tenants.get(self.tenant_by_key_digest.get(digest, ""))
        return None if tenant is None or tenant.disabled else tenant

    def adapters_visible_to(self, tenant: str) -> list[AdapterRecord]:
        """Own and shared adapters by name; a shared one the tenant shadows with its own name is
        left out (resolve() would never reach it). An unknown tenant sees nothing."""
        if tenant not in self.tenants:
            return []
        visible: dict[str, AdapterRecord] = {}
        for (owner, name), record in self.adapters.items():
            if owner == tenant or (owner is None and name not in visible):
                visible[name] = record
        return sorted(visible.values(), key=lambda r: r.name)

    def resolve(self, tenant: str, model: str) -> AdapterRecord | None:
        """The tenant's own adapter `model`, else the shared one, else None (also for an unknown
        tenant). The base model's name is the caller's business."""
        if tenant not in self.tenants:
            return None
        return self.adapters.get((tenant, model)) or self.adapters.get((None, model))


class Registry:
    """Tenants, keys and adapters in one SQLite file (WAL). Safe for several threads (one lock,
    one connection) and for several processes sharing the file (SQLite's own locking)."""

    def __init__(
        self,
        path: Path,
        *,
        reserved_names: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 10.0,
    ):
        """`reserved_names`: names no adapter may take (the base model's served name)."""
        self.path = Path(path)
        self._reserved = frozenset(reserved_names)
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: Snapshot | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed admin change survives a power cut, not just a process crash.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RegistryError(
                    f"{self.path} has registry schema {version}; this code knows {SCHEMA_VERSION}"
                )
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading ------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation()

    def snapshot(self) -> Snapshot:
        """The whole registry at one generation, read in one transaction. Rebuilt only when the
        generation moved (by this process or another one sharing the file)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                generation = self._generation()
                if self._cache is None or self._cache.generation != generation:
                    self._cache = self._read_snapshot(generation)
                return self._cache
            finally:
                self._db.execute("COMMIT")

    def list_keys(self, tenant: str) -> list[dict[str, Any]]:
        """id, label, created_at of each key of the tenant; never the digest in full."""
        with self._lock:
            self._require_tenant(tenant)
            rows = self._db.execute(
                "SELECT key_id, label, created_at FROM api_keys WHERE tenant = ?"
                " ORDER BY created_at, key_id",
                (tenant,),
            ).fetchall()
        return [{"id": k, "label": label, "created_at": t} for k, label, t in rows]

    # ---- tenants ------------------------------------------------------------------------------

    def create_tenant(
        self,
        name: str,
        *,
        weight: float = 1.0,
        priority: str = "interactive",
        limits: Mapping[str, Any] | None = None,
        pinned: bool = False,
    ) -> TenantRecord:
        _check_name(name, "tenant")
        record = TenantRecord(
            name,
            _check_weight(weight),
            _check_priority(priority),
            False,
            _check_bool(pinned, "pinned"),
            _check_limits({} if limits is None else limits),
        )
        with self._write():
            if self._tenant(name) is not None:
                raise Conflict(f"tenant {name!r} already exists")
            self._insert_tenant(record)
            self._bump()
        return record

    def update_tenant(
        self,
        name: str,
        *,
        weight: float | None = None,
        priority: str | None = None,
        limits: Mapping[str, Any] | None = None,
        disabled: bool | None = None,
        pinned: bool | None = None,
    ) -> TenantRecord:
        """Changes the given fields (None: unchanged; `limits={}` clears the limits)."""
        _check_name(name, "tenant")
        changes: dict[str, Any] = {}
        if weight is not None:
            changes["weight"] = _check_weight(weight)
        if priority is not None:
            changes["priority"] = _check_priority(priority)
        if limits is not None:
            changes["limits"] = _check_limits(limits)
        if disabled is not None:
            changes["disabled"] = _check_bool(disabled, "disabled")
        if pinned is not None:
            changes["pinned"] = _check_bool(pinned, "pinned")
        with self._write():
            old = self._require_tenant(name)
            new = TenantRecord(**{**old.__dict__, **changes})
            if new.to_dict() != old.to_dict():
                self._db.execute(
                    "UPDATE tenants SET weight = ?, priority = ?, disabled = ?, pinned = ?,"
                    " limits = ? WHERE name = ?",
                    (new.weight, new.priority, new.disabled, new.pinned, _dump(new.limits), name),
                )
                self._bump()
        return new

    def delete_tenant(self, name: str) -> None:
        """The tenant, its keys and its adapters go (its adapter versions stay counted)."""
        _check_name(name, "tenant")
        with self._write():
            self._require_tenant(name)
            self._db.execute("DELETE FROM adapters WHERE owner = ?", (name,))
            self._db.execute("DELETE FROM tenants WHERE name = ?", (name,))  # keys: cascade
            self._bump()

    # ---- keys ---------------------------------------------------------------------------------

    def add_key(self, tenant: str, digest: str, label: str = "") -> str:
        """Adds a key (its sha256 hex digest) to the tenant; its other keys stay valid, so keys
        rotate by adding the new one, then revoking the old. Returns the key id."""
        _check_name(tenant, "tenant")
        _check_digest(digest, "API key digest")
        _check_label(label)
        with self._write():
            self._require_tenant(tenant)
            key_id = self._insert_key(tenant, digest, label)
            self._bump()
        return key_id

    def revoke_key(self, tenant: str, key_id: str) -> None:
        _check_name(tenant, "tenant")
        with self._write():
            self._require_tenant(tenant)
            gone = self._db.execute(
                "DELETE FROM api_keys WHERE tenant = ? AND key_id = ?", (tenant, key_id)
            ).rowcount
            if not gone:
                raise NotFound(f"tenant {tenant!r} has no key {_show(key_id)}")
            self._bump()

    # ---- adapters -----------------------------------------------------------------------------

    def put_adapter(
        self, owner: str | None, name: str, *, uri: str, sha256: str, rank: int, size_bytes: int
    ) -> AdapterRecord:
        """Registers the adapter, or replaces it by a new version (always: an explicit put is a
        replacement even with the same files). owner None: shared with every tenant."""
        if owner is not None:
            _check_name(owner, "tenant")
        self._check_adapter_name(name)
        fields = _check_adapter_fields(uri, sha256, rank, size_bytes)
        with self._write():
            if owner is not None:
                self._require_tenant(owner)
            record = self._insert_adapter(owner, name, *fields)
            self._bump()
        return record

    def delete_adapter(self, owner: str | None, name: str) -> AdapterRecord:
        """Removes the adapter; returns the version that was current."""
        if owner is not None:
            _check_name(owner, "tenant")
        _check_name(name, "adapter")
        with self._write():
            record = self._adapter(owner, name)
            if record is None:
                raise NotFound(f"{_describe(owner, name)} not found")
            self._db.execute(
                "DELETE FROM adapters WHERE owner = ? AND name = ?", (owner or _SHARED, name)
            )
            self._bump()
        return record

    # ---- start-up -----------------------------------------------------------------------------

    def seed(
        self,
        tenants: list[TenantConfig],
        adapters: list[AdapterConfig],
        adapter_digest: Callable[[AdapterConfig], tuple[str, int, int]],
    ) -> None:
        """Upserts what config declares, in one transaction (all or nothing):

        - a config tenant is created if missing (default settings); an existing one keeps its
          run-time settings; its config key digests are added if missing (label "config"). A
          digest held by another tenant is a Conflict: a key never moves silently.
        - a config adapter (`shared: true` -> owner None) gets a new version only if missing or
          its uri or digest changed. `adapter_digest` returns (sha256, rank, size_bytes); it
          runs for every config adapter before the transaction (it may fetch and hash files),
          and whatever it raises propagates with nothing written. A relative local path
          becomes absolute (from the current directory).

        Nothing is deleted: what an admin added at run time stays; what an admin deleted or
        revoked that config still declares comes back. Bumps the generation once if anything
        changed, not at all otherwise.
        """
        planned = []
        for a in adapters:
            owner = None if a.shared else a.owner
            if owner is not None:
                _check_name(owner, "tenant")
            self._check_adapter_name(a.name)
            uri = a.path if _is_remote(a.path) else os.path.abspath(a.path)
            sha256, rank, size_bytes = adapter_digest(a)
            planned.append((owner, a.name, _check_adapter_fields(uri, sha256, rank, size_bytes)))
        for t in tenants:
            _check_name(t.name, "tenant")
            for digest in t.api_key_sha256:
                _check_digest(digest, "API key digest")
        with self._write():
            changed = False
            for t in tenants:
                if self._tenant(t.name) is None:
                    self._insert_tenant(TenantRecord(t.name))
                    changed = True
                for digest in t.api_key_sha256:
                    holder = self._key_holder(digest)
                    if holder is None:
                        self._insert_key(t.name, digest, "config")
                        changed = True
                    elif holder != t.name:
                        raise Conflict(
                            f"tenant {t.name!r}: a configured API key belongs to tenant {holder!r}"
                        )
            for owner, name, (uri, sha256, rank, size_bytes) in planned:
                if owner is not None and self._tenant(owner) is None:
                    raise NotFound(f"{_describe(owner, name)}: tenant {owner!r} not found")
                current = self._adapter(owner, name)
                if current is None or (current.uri, current.sha256) != (uri, sha256):
                    self._insert_adapter(owner, name, uri, sha256, rank, size_bytes)
                    changed = True
            if changed:
                self._bump()

    # ---- internals (callers hold the lock) ----------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction: committed whole or rolled back whole."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise RegistryError(f"could not commit to the registry: {e}") from e

    def _generation(self) -> int:
        return self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]

    def _bump(self) -> None:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")

    def _check_adapter_name(self, name: str) -> None:
        _check_name(name, "adapter")
        if name in self._reserved:
            raise Invalid(f"adapter name {name!r} is reserved (the base model's name)")

    def _tenant(self, name: str) -> TenantRecord | None:
        row = self._db.execute(
            "SELECT name, weight, priority, disabled, pinned, limits FROM tenants WHERE name = ?",
            (name,),
        ).fetchone()
        return None if row is None else _tenant_record(row)

    def _require_tenant(self, name: str) -> TenantRecord:
        record = self._tenant(name)
        if record is None:
            raise NotFound(f"tenant {_show(name)} not found")
        return record

    def _insert_tenant(self, r: TenantRecord) -> None:
        self._db.execute(
            "INSERT INTO tenants (name, weight, priority, disabled, pinned, limits, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (r.name, r.weight, r.priority, r.disabled, r.pinned, _dump(r.limits), self._clock()),
        )

    def _key_holder(self, digest: str) -> str | None:
        row = self._db.execute("SELECT tenant FROM api_keys WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else row[0]

    def _insert_key(self, tenant: str, digest: str, label: str) -> str:
        holder = self._key_holder(digest)
        if holder is not None:
            where = "this tenant" if holder == tenant else "another tenant"
            raise Conflict(f"this API key is already registered to {where}")
        key_id = digest[:KEY_ID_CHARS]
        taken = self._db.execute(
            "SELECT 1 FROM api_keys WHERE tenant = ? AND key_id = ?", (tenant, key_id)
        ).fetchone()
        if taken:  # two digests of one tenant sharing 48 bits: astronomically unlikely
            raise Conflict(f"tenant {tenant!r} already has a key with id {key_id}; use another key")
        self._db.execute(
            "INSERT INTO api_keys (digest, tenant, key_id, label, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (digest, tenant, key_id, label, self._clock()),
        )
        return key_id

    def _adapter(self, owner: str | None, name: str) -> AdapterRecord | None:
        row = self._db.execute(
            "SELECT owner, name, version, uri, sha256, rank, size_bytes, created_at FROM adapters"
            " WHERE owner = ? AND name = ?",
            (owner or _SHARED, name),
        ).fetchone()
        return None if row is None else _adapter_record(row)

    def _insert_adapter(
        self, owner: str | None, name: str, uri: str, sha256: str, rank: int, size_bytes: int
    ) -> AdapterRecord:
        key = (owner or _SHARED, name)
        row = self._db.execute(
            "SELECT last_version FROM adapter_versions WHERE owner = ? AND name = ?", key
        ).fetchone()
        version = (row[0] if row else 0) + 1
        self._db.execute(
            "INSERT INTO adapter_versions (owner, name, last_version) VALUES (?, ?, ?)"
            " ON CONFLICT (owner, name) DO UPDATE SET last_version = excluded.last_version",
            (*key, version),
        )
        record = AdapterRecord(owner, name, version, uri, sha256, rank, size_bytes, self._clock())
        self._db.execute(
            "INSERT INTO adapters (owner, name, version, uri, sha256, rank, size_bytes,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (owner, name) DO UPDATE"
            " SET version = excluded.version, uri = excluded.uri, sha256 = excluded.sha256,"
            " rank = excluded.rank, size_bytes = excluded.size_bytes,"
            " created_at = excluded.created_at",
            (*key, version, uri, sha256, rank, size_bytes, record.created_at),
        )
        return record

    def _read_snapshot(self, generation: int) -> Snapshot:
        tenants = {
            row[0]: _tenant_record(row)
            for row in self._db.execute(
                "SELECT name, weight, priority, disabled, pinned, limits FROM tenants ORDER BY name"
            )
        }
        keys = dict(self._db.execute("SELECT digest, tenant FROM api_keys ORDER BY digest"))
        adapters = {}
        for row in self._db.execute(
            "SELECT owner, name, version, uri, sha256, rank, size_bytes, created_at FROM adapters"
            " ORDER BY owner, name"
        ):
            record = _adapter_record(row)
            adapters[(record.owner, record.name)] = record
        return Snapshot(
            generation,
            MappingProxyType(tenants),
            MappingProxyType(keys),
            MappingProxyType(adapters),
        )


# ---- rows and checks ----------------------------------------------------------------------------


def _tenant_record(row: tuple) -> TenantRecord:
    name, weight, priority, disabled, pinned, limits = row
    return TenantRecord(name, weight, priority, bool(disabled), bool(pinned), json.loads(limits))


def _adapter_record(row: tuple) -> AdapterRecord:
    owner, *rest = row
    return AdapterRecord(None if owner == _SHARED else owner, *rest)


def _dump(limits: Mapping[str, Any]) -> str:
    return json.dumps(_thaw(limits), sort_keys=True, allow_nan=False)


def _show(value: object) -> str:
    """A caller's value in a message: repr, cut short (names are echoed, never unbounded)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(owner: str | None, name: str) -> str:
    return f"shared adapter {name!r}" if owner is None else f"adapter {name!r} of tenant {owner!r}"


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise Invalid(
            f"{what} name {_show(name)} is invalid: 1-64 characters, letters, digits, '.', '_'"
            " or '-', starting with a letter or digit"
        )


def _check_weight(weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise Invalid(f"weight must be a number, not {_show(weight)}")
    if not (math.isfinite(weight) and weight > 0):
        raise Invalid(f"weight must be a finite number > 0, not {weight!r}")
    return float(weight)


def _check_priority(priority: object) -> str:
    if priority not in PRIORITIES:
        raise Invalid(f"priority must be one of {', '.join(PRIORITIES)}, not {_show(priority)}")
    return priority  # type: ignore[return-value]


def _check_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"{what} must be true or false, not {_show(value)}")
    return value


def _check_limits(limits: object) -> dict[str, Any]:
    """A JSON object (keys are strings, numbers finite); what it means is checked elsewhere."""
    if not isinstance(limits, Mapping):
        raise Invalid(f"limits must be a JSON object, not {type(limits).__name__}")
    if any(not isinstance(k, str) for k in limits):
        raise Invalid("limits must be a JSON object with string keys")
    try:
        return json.loads(json.dumps(_thaw(limits), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise Invalid(f"limits must be plain JSON: {e}") from None


def _check_digest(digest: object, what: str) -> None:
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise Invalid(f"{what} must be a lowercase sha256 hex digest (64 characters)")


def _check_label(label: object) -> None:
    if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS or not label.isprintable():
        raise Invalid(f"key label must be printable text of at most {MAX_LABEL_CHARS} characters")


def _is_remote(uri: str) -> bool:
    return uri.startswith(("s3://", "builtin:"))


def _check_uri(uri: object) -> str:
    if not isinstance(uri, str) or not uri or len(uri) > MAX_URI_CHARS:
        raise Invalid(f"uri must be text of 1 to {MAX_URI_CHARS} characters")
    if not uri.isprintable():
        raise Invalid(f"uri {_show(uri)} contains control characters")
    if uri.startswith("builtin:"):
        if not _NAME.fullmatch(uri.removeprefix("builtin:")):
            raise Invalid(f"uri {_show(uri)}: builtin:<name> needs a valid adapter name")
    elif uri.startswith("s3://"):
        if not _S3_URI.fullmatch(uri):
            raise Invalid(f"uri {_show(uri)} is not s3://<bucket>/<prefix>")
    elif not os.path.isabs(uri):
        raise Invalid(f"uri {_show(uri)} must be s3://..., an absolute path or builtin:<name>")
    return uri


def _check_adapter_fields(
    uri: object, sha256: object, rank: object, size_bytes: object
) -> tuple[str, str, int, int]:
    _check_uri(uri)
    # An adapter declared in the config is registered unvalidated, with no digest (sha256 "",
    # rank 0): the engine that first loads it validates it (app/adapter_files.py). Adapters
    # registered through the admin API are validated first and always carry both.
    if sha256 == "" and rank == 0:
        return uri, sha256, rank, size_bytes  # type: ignore[return-value]
    _check_digest(sha256, "adapter sha256")
    for value, what, least in ((rank, "rank", 1), (size_bytes, "size_bytes", 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise Invalid(f"{what} must be an integer >= {least}, not {_show(value)}")
    return uri, sha256, rank, size_bytes  # type: ignore[return-value]
