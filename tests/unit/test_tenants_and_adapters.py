"""API keys identify tenants; tenants see only the base model, their adapters and shared ones."""

from __future__ import annotations

import pytest

from app.adapters import AdapterCatalog, ModelNotFound
from app.config import AdapterConfig, TenantConfig
from app.tenants import Tenant, TenantDirectory, hash_api_key

TENANTS = [
    TenantConfig(name="acme", api_key_sha256=[hash_api_key("sk-a"), hash_api_key("sk-a2")]),
    TenantConfig(name="globex", api_key_sha256=[hash_api_key("sk-g")]),
]
ADAPTERS = [
    AdapterConfig(name="acme-lora", path="/a", owner="acme"),
    AdapterConfig(name="globex-lora", path="/g", owner="globex"),
    AdapterConfig(name="common", path="/c", shared=True),
]


@pytest.mark.parametrize(
    ("header", "tenant"),
    [
        ("Bearer sk-a", "acme"),
        ("bearer sk-a2", "acme"),  # scheme is case-insensitive; both rotated keys work
        ("Bearer sk-g", "globex"),
        ("Bearer sk-x", None),
        ("sk-a", None),  # no scheme
        ("Basic sk-a", None),
        ("Bearer ", None),
        (None, None),
    ],
)
def test_authentication(header, tenant):
    found = TenantDirectory(TENANTS).authenticate(header)
    assert (found.name if found else None) == tenant


def test_keys_are_held_only_as_digests():
    directory = TenantDirectory(TENANTS)
    assert "sk-a" not in repr(vars(directory))


def test_model_resolution():
    reg = AdapterCatalog("base", ADAPTERS)
    acme, globex = Tenant("acme"), Tenant("globex")
    assert reg.resolve("base", acme) is None
    assert reg.resolve("acme-lora", acme) == "acme-lora"
    assert reg.resolve("common", globex) == "common"
    with pytest.raises(ModelNotFound):
        reg.resolve("globex-lora", acme)  # another tenant's adapter
    with pytest.raises(ModelNotFound):
        reg.resolve("nope", acme)
    assert {a.name for a in reg.visible_to(acme)} == {"acme-lora", "common"}


def test_demo_tenants_file_matches_the_demo_table():
    """tenants.demo.yaml holds digests; app.builtin_model.DEMO_TENANTS the clear demo keys."""
    from pathlib import Path

    from app.builtin_model import DEMO_TENANTS, SHARED_DEMO_ADAPTER
    from app.config import AppConfig

    root = Path(__file__).resolve().parents[2]
    cfg = AppConfig.from_args({"tenants_file": str(root / "tenants.demo.yaml")})
    directory = TenantDirectory(cfg.tenants)
    catalog = AdapterCatalog("base", cfg.adapters)
    for demo in DEMO_TENANTS:
        tenant = directory.authenticate(f"Bearer {demo.api_key}")
        assert tenant is not None and tenant.name == demo.name
        assert {a.name for a in catalog.visible_to(tenant)} == {demo.adapter, SHARED_DEMO_ADAPTER}
