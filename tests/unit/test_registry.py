"""The durable registry (app/registry.py): every operation and error, versions, resolution across
tenants and shared names, durability across reopening, atomicity, seeding, concurrent writers."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

import pytest

from app.config import AdapterConfig, TenantConfig
from app.registry import (
    AdapterRecord,
    Conflict,
    Invalid,
    NotFound,
    Registry,
    RegistryError,
    Snapshot,
    TenantRecord,
)

BASE = "builtin-moe"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


SHA_A, SHA_B = digest("files-a"), digest("files-b")
ADAPTER = {"uri": "s3://adapters/acme/support", "sha256": SHA_A, "rank": 8, "size_bytes": 1000}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "registry.db"


@pytest.fixture
def reg(path: Path) -> Registry:
    with Registry(path, reserved_names={BASE}) as r:
        yield r


@pytest.fixture
def acme(reg: Registry) -> Registry:
    reg.create_tenant("acme")
    return reg


def state(reg: Registry) -> tuple:
    """Everything observable, to compare before and after a refused operation."""
    snap = reg.snapshot()
    keys = {t: reg.list_keys(t) for t in snap.tenants}
    return reg.generation, dict(snap.tenants), dict(snap.tenant_by_key_digest), snap.adapters, keys


# ---- tenants ------------------------------------------------------------------------------------


def test_create_tenant_defaults_and_settings(reg: Registry):
    assert reg.generation == 0
    assert reg.create_tenant("acme") == TenantRecord("acme")
    made = reg.create_tenant(
        "globex", weight=3, priority="batch", limits={"rps": 5, "models": ["a"]}, pinned=True
    )
    assert made == TenantRecord("globex", 3.0, "batch", False, True, {"rps": 5, "models": ["a"]})
    snap = reg.snapshot()
    assert snap.generation == reg.generation == 2
    assert snap.tenants["globex"] == made
    assert snap.tenants["globex"].to_dict()["limits"] == {"rps": 5, "models": ["a"]}


def test_limits_are_read_only_and_json_serialisable(acme: Registry):
    """A snapshot is shared by every reader: none may change what another sees."""
    record = acme.update_tenant("acme", limits={"caps": {"n": 4}, "models": ["x"]})
    with pytest.raises(TypeError):
        record.limits["caps"]["n"] = 1000  # type: ignore[index]
    assert json.loads(json.dumps(record.to_dict()))["limits"] == {"caps": {"n": 4}, "models": ["x"]}


def test_create_tenant_conflict_and_invalid(acme: Registry):
    with pytest.raises(Conflict, match="tenant 'acme' already exists"):
        acme.create_tenant("acme")
    bad = [
        ({"name": "_shared"}, "tenant name '_shared' is invalid"),
        ({"name": "a/b"}, "tenant name 'a/b' is invalid"),
        ({"name": "x" * 65}, "tenant name .* is invalid"),
        ({"name": "acme2\n"}, "is invalid"),
        ({"name": "ok", "weight": 0}, "weight must be a finite number > 0"),
        ({"name": "ok", "weight": float("inf")}, "weight must be a finite number > 0"),
        ({"name": "ok", "weight": True}, "weight must be a number"),
        ({"name": "ok", "priority": "urgent"}, "priority must be one of interactive, batch"),
        ({"name": "ok", "limits": [1]}, "limits must be a JSON object"),
        ({"name": "ok", "limits": {1: 2}}, "string keys"),
        ({"name": "ok", "limits": {"x": float("nan")}}, "limits must be plain JSON"),
        ({"name": "ok", "limits": {"x": object()}}, "limits must be plain JSON"),
        ({"name": "ok", "pinned": "yes"}, "pinned must be true or false"),
    ]
    before = state(acme)
    for kwargs, message in bad:
        with pytest.raises(Invalid, match=message):
            acme.create_tenant(**kwargs)
    assert state(acme) == before


def test_update_tenant(acme: Registry):
    gen = acme.generation
    updated = acme.update_tenant("acme", weight=2.5, priority="batch", disabled=True, pinned=True)
    assert updated == TenantRecord("acme", 2.5, "batch", True, True, {})
    assert acme.generation == gen + 1
    assert acme.update_tenant("acme", limits={"rps": 1}).limits == {"rps": 1}
    assert acme.update_tenant("acme", limits={}).limits == {}  # {} clears, None keeps
    assert acme.snapshot().tenants["acme"] == TenantRecord("acme", 2.5, "batch", True, True, {})


def test_update_tenant_without_change_keeps_generation(acme: Registry):
    gen = acme.generation
    acme.update_tenant("acme")
    acme.update_tenant("acme", weight=1.0, priority="interactive", disabled=False)
    assert acme.generation == gen


def test_update_tenant_errors(acme: Registry):
    before = state(acme)
    with pytest.raises(NotFound, match="tenant 'nobody' not found"):
        acme.update_tenant("nobody", weight=2)
    with pytest.raises(Invalid, match="disabled must be true or false"):
        acme.update_tenant("acme", disabled=1)
    with pytest.raises(Invalid, match="weight"):
        acme.update_tenant("acme", weight=-1, priority="batch")  # nothing half-applied
    assert state(acme) == before


def test_delete_tenant_takes_keys_and_adapters(acme: Registry):
    acme.create_tenant("globex")
    acme.add_key("acme", digest("k1"))
    acme.put_adapter("acme", "support", **ADAPTER)
    acme.put_adapter("globex", "support", **ADAPTER)
    acme.put_adapter(None, "assistant", **ADAPTER)
    gen = acme.generation
    acme.delete_tenant("acme")
    snap = acme.snapshot()
    assert snap.generation == gen + 1
    assert "acme" not in snap.tenants
    assert snap.tenant_by_key_digest == {}
    assert set(snap.adapters) == {("globex", "support"), (None, "assistant")}
    with pytest.raises(NotFound, match="tenant 'acme' not found"):
        acme.delete_tenant("acme")
    with pytest.raises(NotFound, match="tenant 'acme' not found"):
        acme.list_keys("acme")
    # The key is free again; a new tenant of the same name starts with nothing.
    acme.create_tenant("acme")
    assert acme.list_keys("acme") == []
    assert acme.snapshot().adapters_visible_to("acme") == [snap.adapters[(None, "assistant")]]
    acme.add_key("acme", digest("k1"))


# ---- keys ---------------------------------------------------------------------------------------


def test_keys_add_list_revoke(acme: Registry):
    times = iter([100.0, 200.0])
    acme._clock = lambda: next(times)
    k1, k2 = digest("sk-old"), digest("sk-new")
    gen = acme.generation
    assert acme.add_key("acme", k1, "laptop") == k1[:12]
    assert acme.add_key("acme", k2) == k2[:12]
    assert acme.generation == gen + 2
    assert acme.list_keys("acme") == [
        {"id": k1[:12], "label": "laptop", "created_at": 100.0},
        {"id": k2[:12], "label": "", "created_at": 200.0},
    ]
    assert dict(acme.snapshot().tenant_by_key_digest) == {k1: "acme", k2: "acme"}  # both valid
    acme.revoke_key("acme", k1[:12])
    assert dict(acme.snapshot().tenant_by_key_digest) == {k2: "acme"}
    assert [k["id"] for k in acme.list_keys("acme")] == [k2[:12]]
    assert acme.generation == gen + 3


def test_key_errors(acme: Registry):
    acme.create_tenant("globex")
    key = digest("sk-acme")
    key_id = acme.add_key("acme", key)
    before = state(acme)
    with pytest.raises(Conflict, match="already registered to this tenant"):
        acme.add_key("acme", key)
    with pytest.raises(Conflict, match="already registered to another tenant") as err:
        acme.add_key("globex", key)
    assert key not in str(err.value) and key_id not in str(err.value)
    with pytest.raises(Invalid, match="lowercase sha256 hex digest"):
        acme.add_key("acme", key.upper())
    with pytest.raises(Invalid, match="lowercase sha256 hex digest"):
        acme.add_key("acme", key[:-1])
    with pytest.raises(Invalid, match="key label"):
        acme.add_key("acme", digest("other"), "x" * 129)
    with pytest.raises(Invalid, match="key label"):
        acme.add_key("acme", digest("other"), "two\nlines")
    with pytest.raises(NotFound, match="tenant 'nobody' not found"):
        acme.add_key("nobody", digest("other"))
    with pytest.raises(NotFound, match="tenant 'globex' has no key"):
        acme.revoke_key("globex", key_id)  # another tenant's key id is not found
    with pytest.raises(NotFound, match="tenant 'nobody' not found"):
        acme.revoke_key("nobody", key_id)
    with pytest.raises(NotFound):
        acme.list_keys("nobody")
    assert state(acme) == before


def test_list_keys_never_shows_the_digest(acme: Registry):
    key = digest("sk-secret")
    acme.add_key("acme", key, "ci")
    assert key not in json.dumps(acme.list_keys("acme"))


def test_authenticate_skips_disabled_tenants(acme: Registry):
    key = digest("sk-acme")
    acme.add_key("acme", key)
    assert acme.snapshot().authenticate(key) == TenantRecord("acme")
    assert acme.snapshot().authenticate(digest("unknown")) is None
    acme.update_tenant("acme", disabled=True)
    snap = acme.snapshot()
    assert snap.tenant_by_key_digest[key] == "acme"
    assert snap.authenticate(key) is None


# ---- adapters -----------------------------------------------------------------------------------


def test_put_adapter_versions_and_engine_names(acme: Registry):
    times = iter([10.0, 20.0, 30.0])
    acme._clock = lambda: next(times)
    gen = acme.generation
    v1 = acme.put_adapter("acme", "support", **ADAPTER)
    assert v1 == AdapterRecord("acme", "support", 1, ADAPTER["uri"], SHA_A, 8, 1000, 10.0)
    assert v1.engine_name == "acme/support/v1" and not v1.shared
    v2 = acme.put_adapter(
        "acme", "support", uri="/adapters/v2", sha256=SHA_B, rank=16, size_bytes=9
    )
    assert (v2.version, v2.uri, v2.rank, v2.engine_name) == (
        2,
        "/adapters/v2",
        16,
        "acme/support/v2",
    )
    assert acme.generation == gen + 2
    assert acme.snapshot().adapters == {("acme", "support"): v2}  # only the current version
    shared = acme.put_adapter(
        None, "assistant", uri="builtin:initech-code", sha256=SHA_A, rank=1, size_bytes=0
    )
    assert shared.shared and shared.engine_name == "_shared/assistant/v1"
    assert shared.to_dict()["engine_name"] == "_shared/assistant/v1"


def test_versions_never_reused(acme: Registry):
    """After deleting an adapter, or its whole tenant, the next version still counts on:
    an engine may still hold acme/support/v2's weights."""
    for _ in range(2):
        acme.put_adapter("acme", "support", **ADAPTER)
    assert acme.delete_adapter("acme", "support").version == 2
    assert acme.put_adapter("acme", "support", **ADAPTER).version == 3
    acme.delete_tenant("acme")
    acme.create_tenant("acme")
    assert acme.put_adapter("acme", "support", **ADAPTER).version == 4
    # Counters are per (owner, name): other names and shared adapters count from 1.
    assert acme.put_adapter("acme", "legal", **ADAPTER).version == 1
    assert acme.put_adapter(None, "support", **ADAPTER).version == 1


def test_put_adapter_errors(acme: Registry):
    acme.put_adapter("acme", "support", **ADAPTER)
    before = state(acme)
    cases = [
        ({"owner": "nobody"}, NotFound, "tenant 'nobody' not found"),
        ({"owner": "_shared"}, Invalid, "tenant name '_shared' is invalid"),
        ({"name": "a/b"}, Invalid, "adapter name 'a/b' is invalid"),
        ({"name": BASE}, Invalid, "adapter name 'builtin-moe' is reserved"),
        ({"uri": "relative/dir"}, Invalid, "must be s3://..., an absolute path or builtin"),
        ({"uri": ""}, Invalid, "uri must be text"),
        ({"uri": "s3://"}, Invalid, r"is not s3://<bucket>/<prefix>"),
        ({"uri": "/tmp/a\x00b"}, Invalid, "control characters"),
        ({"uri": "builtin:../x"}, Invalid, "builtin:<name> needs a valid adapter name"),
        ({"sha256": "abc"}, Invalid, "adapter sha256 must be a lowercase sha256 hex digest"),
        ({"rank": 0}, Invalid, "rank must be an integer >= 1"),
        ({"rank": 8.0}, Invalid, "rank must be an integer >= 1"),
        ({"size_bytes": -1}, Invalid, "size_bytes must be an integer >= 0"),
    ]
    for change, error, message in cases:
        args = {"owner": "acme", "name": "support", **ADAPTER, **change}
        owner, name = args.pop("owner"), args.pop("name")
        with pytest.raises(error, match=message):
            acme.put_adapter(owner, name, **args)
    assert state(acme) == before
    assert acme.put_adapter("acme", "support", **ADAPTER).version == 2  # no version was spent


def test_delete_adapter(acme: Registry):
    mine = acme.put_adapter("acme", "support", **ADAPTER)
    shared = acme.put_adapter(None, "support", **ADAPTER)
    gen = acme.generation
    assert acme.delete_adapter("acme", "support") == mine
    assert acme.generation == gen + 1
    assert acme.snapshot().adapters == {(None, "support"): shared}
    with pytest.raises(NotFound, match="adapter 'support' of tenant 'acme' not found"):
        acme.delete_adapter("acme", "support")
    assert acme.delete_adapter(None, "support") == shared
    with pytest.raises(NotFound, match="shared adapter 'support' not found"):
        acme.delete_adapter(None, "support")
    with pytest.raises(Invalid, match="adapter name"):
        acme.delete_adapter("acme", "../x")
    assert acme.generation == gen + 2


# ---- resolution ---------------------------------------------------------------------------------


def test_resolve_and_visibility_with_name_collisions(reg: Registry):
    """Two tenants may both have `support`; a tenant's own name shadows a shared one."""
    for t in ("acme", "globex", "initech"):
        reg.create_tenant(t)
    acme_support = reg.put_adapter("acme", "support", **ADAPTER)
    globex_support = reg.put_adapter("globex", "support", **ADAPTER)
    shared_support = reg.put_adapter(None, "support", **ADAPTER)
    assistant = reg.put_adapter(None, "assistant", **ADAPTER)
    legal = reg.put_adapter("globex", "legal", **ADAPTER)
    snap = reg.snapshot()
    assert snap.resolve("acme", "support") == acme_support
    assert snap.resolve("globex", "support") == globex_support
    assert snap.resolve("initech", "support") == shared_support
    assert snap.resolve("acme", "assistant") == assistant
    assert snap.resolve("acme", "legal") is None  # another tenant's adapter: as if absent
    assert snap.resolve("acme", "nothing") is None
    assert snap.resolve("nobody", "assistant") is None
    assert snap.adapters_visible_to("acme") == [assistant, acme_support]
    assert snap.adapters_visible_to("globex") == [assistant, legal, globex_support]
    assert snap.adapters_visible_to("initech") == [assistant, shared_support]
    assert snap.adapters_visible_to("nobody") == []
    assert len({a.engine_name for a in snap.adapters.values()}) == 5


def test_snapshot_is_cached_per_generation_and_immutable(acme: Registry):
    first = acme.snapshot()
    assert acme.snapshot() is first
    acme.add_key("acme", digest("k"))
    second = acme.snapshot()
    assert second is not first and second.generation == first.generation + 1
    assert first.tenant_by_key_digest == {}  # an old snapshot does not change
    assert isinstance(second, Snapshot)
    with pytest.raises(TypeError):
        second.tenants["x"] = TenantRecord("x")  # type: ignore[index]


# ---- durability and atomicity -------------------------------------------------------------------


def test_reopening_sees_everything(path: Path):
    with Registry(path) as reg:
        reg.create_tenant("acme", weight=2, limits={"rps": 3})
        reg.add_key("acme", digest("sk"), "main")
        reg.put_adapter("acme", "support", **ADAPTER)
        reg.put_adapter("acme", "support", **ADAPTER)
        reg.delete_adapter("acme", "support")
        reg.put_adapter(None, "assistant", **ADAPTER)
        before = state(reg)
    with Registry(path) as reopened:
        assert state(reopened) == before
        assert reopened.put_adapter("acme", "support", **ADAPTER).version == 3
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(path: Path):
    Registry(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(RegistryError, match="schema 99"):
        Registry(path)


def test_failure_inside_the_transaction_rolls_back(acme: Registry, monkeypatch):
    """A failure after some rows were written (here: the generation bump) leaves nothing."""
    acme.put_adapter("acme", "support", **ADAPTER)
    before = state(acme)

    def broken_bump() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(acme, "_bump", broken_bump)
    with pytest.raises(sqlite3.OperationalError):
        acme.put_adapter("acme", "support", **ADAPTER)
    with pytest.raises(sqlite3.OperationalError):
        acme.delete_tenant("acme")
    monkeypatch.undo()
    assert state(acme) == before
    assert acme.put_adapter("acme", "support", **ADAPTER).version == 2


# ---- seeding ------------------------------------------------------------------------------------


def config() -> tuple[list[TenantConfig], list[AdapterConfig]]:
    tenants = [
        TenantConfig(name="acme", api_key_sha256=[digest("sk-acme")]),
        TenantConfig(name="globex", api_key_sha256=[digest("sk-globex"), digest("sk-globex-2")]),
    ]
    adapters = [
        AdapterConfig(name="support", path="builtin:acme-support", owner="acme"),
        AdapterConfig(name="support-gx", path="s3://bucket/gx", owner="globex"),
        AdapterConfig(name="assistant", path="builtin:initech-code", shared=True),
    ]
    return tenants, adapters


class Digests:
    """adapter_digest stand-in: a digest per path, counting calls."""

    def __init__(self) -> None:
        self.by_path: dict[str, str] = {}
        self.calls = 0

    def __call__(self, a: AdapterConfig) -> tuple[str, int, int]:
        self.calls += 1
        return self.by_path.get(a.path, SHA_A), 8, 4096


def test_seed_creates_and_is_idempotent(reg: Registry):
    tenants, adapters = config()
    digests = Digests()
    reg.seed(tenants, adapters, digests)
    snap = reg.snapshot()
    assert snap.generation == 1  # one transaction, one bump
    assert set(snap.tenants) == {"acme", "globex"}
    assert snap.tenant_by_key_digest[digest("sk-globex-2")] == "globex"
    assert reg.list_keys("acme")[0]["label"] == "config"
    assert snap.resolve("acme", "support").engine_name == "acme/support/v1"
    assert snap.resolve("globex", "assistant").engine_name == "_shared/assistant/v1"
    assert digests.calls == 3
    reg.seed(tenants, adapters, digests)
    assert reg.snapshot() is snap  # nothing changed, not even the generation


def test_seed_keeps_run_time_state(reg: Registry):
    tenants, adapters = config()
    reg.seed(tenants, adapters, Digests())
    reg.update_tenant("acme", weight=5, disabled=True)
    reg.add_key("acme", digest("sk-rotated"))
    reg.create_tenant("initech")
    reg.put_adapter("acme", "extra", **ADAPTER)
    before = state(reg)
    reg.seed(tenants, adapters, Digests())
    assert state(reg) == before


def test_seed_restores_deleted_config_entries(reg: Registry):
    """Config declares what exists at start-up: what an admin deleted, config brings back."""
    tenants, adapters = config()
    reg.seed(tenants, adapters, Digests())
    reg.delete_tenant("acme")
    reg.revoke_key("globex", digest("sk-globex")[:12])
    gen = reg.generation
    reg.seed(tenants, adapters, Digests())
    snap = reg.snapshot()
    assert snap.generation == gen + 1
    assert snap.tenant_by_key_digest[digest("sk-globex")] == "globex"
    assert snap.resolve("acme", "support").version == 2  # never reused


def test_seed_new_version_only_when_uri_or_digest_changes(reg: Registry):
    tenants, adapters = config()
    digests = Digests()
    reg.seed(tenants, adapters, digests)
    digests.by_path["s3://bucket/gx"] = SHA_B  # new files under the same uri
    adapters[2] = AdapterConfig(name="assistant", path="builtin:acme-support", shared=True)
    gen = reg.generation
    reg.seed(tenants, adapters, digests)
    snap = reg.snapshot()
    assert snap.generation == gen + 1
    assert snap.resolve("acme", "support").version == 1
    gx = snap.resolve("globex", "support-gx")
    assert (gx.version, gx.sha256) == (2, SHA_B)
    shared = snap.resolve("acme", "assistant")
    assert (shared.version, shared.uri) == (2, "builtin:acme-support")


def test_seed_makes_relative_paths_absolute(reg: Registry, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tenants, _ = config()
    reg.seed(tenants, [AdapterConfig(name="local", path="adapters/a", owner="acme")], Digests())
    assert reg.snapshot().resolve("acme", "local").uri == str(tmp_path / "adapters" / "a")


def test_seed_failures_change_nothing(reg: Registry):
    tenants, adapters = config()
    reg.create_tenant("initech")
    reg.add_key("initech", digest("sk-acme"))  # a run-time key that config gives acme
    before = state(reg)
    with pytest.raises(Conflict, match="tenant 'acme': a configured API key belongs to tenant"):
        reg.seed(tenants, adapters, Digests())
    assert state(reg) == before

    def rejected(a: AdapterConfig) -> tuple[str, int, int]:
        raise ValueError(f"adapter {a.name}: adapter_model.safetensors is missing")

    with pytest.raises(ValueError, match="safetensors is missing"):
        reg.seed(tenants[1:], adapters, rejected)
    with pytest.raises(Invalid, match="adapter sha256"):
        reg.seed(tenants[1:], adapters, lambda a: ("bad", 8, 1))
    orphan = AdapterConfig(name="x", path="builtin:x", owner="nobody")
    with pytest.raises(NotFound, match="adapter 'x' of tenant 'nobody': tenant 'nobody' not found"):
        reg.seed(tenants[1:], [orphan], Digests())
    assert state(reg) == before


# ---- concurrency --------------------------------------------------------------------------------


def test_concurrent_writers(path: Path):
    """Threads on one Registry and a second Registry on the same file (as another process would
    be): every write lands, versions are distinct, the generation counts each one once."""
    first = Registry(path)
    second = Registry(path)
    first.create_tenant("acme")
    start = first.generation
    threads_per_registry, puts = 4, 15
    errors: list[BaseException] = []
    versions: list[int] = []
    lock = threading.Lock()

    def work(reg: Registry, i: int) -> None:
        try:
            reg.add_key("acme", digest(f"{id(reg)}-{i}"))
            for _ in range(puts):
                v = reg.put_adapter("acme", "support", **ADAPTER).version
                with lock:
                    versions.append(v)
                reg.snapshot()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [
        threading.Thread(target=work, args=(reg, i))
        for reg in (first, second)
        for i in range(threads_per_registry)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    total = 2 * threads_per_registry * puts
    assert sorted(versions) == list(range(1, total + 1))
    writes = total + 2 * threads_per_registry
    assert first.generation == second.generation == start + writes
    assert first.snapshot().adapters[("acme", "support")].version == total
    assert len(second.list_keys("acme")) == 2 * threads_per_registry
    first.close()
    second.close()


def test_seed_owner_and_shared_means_shared(reg: Registry):
    """Config's `owner` + `shared: true` was visible to every tenant: it stays a shared adapter."""
    tenants, _ = config()
    both = AdapterConfig(name="faq", path="builtin:faq", owner="acme", shared=True)
    reg.seed(tenants, [both], Digests())
    assert reg.snapshot().resolve("globex", "faq").owner is None
