"""The ingress's tenant gate over a real registry snapshot: API keys identify tenants; tenants
see only the base model, their own adapters and shared ones; names are local to a tenant."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from app.config import AdapterConfig, AppConfig, TenantConfig
from app.registry import Registry, Snapshot
from app.tenancy import Refused, Tenancy, hash_api_key

TENANTS = [
    TenantConfig(name="acme", api_key_sha256=[hash_api_key("sk-a"), hash_api_key("sk-a2")]),
    TenantConfig(name="globex", api_key_sha256=[hash_api_key("sk-g")]),
]
ADAPTERS = [
    AdapterConfig(name="support", path="/a", owner="acme"),
    AdapterConfig(name="support", path="/g", owner="globex"),  # same name, another tenant
    AdapterConfig(name="legal", path="/g2", owner="globex"),
    AdapterConfig(name="common", path="/c", shared=True),
]


@dataclass
class StaticView:
    snapshot: Snapshot


def tenancy_over(tmp_path: Path, tenants=TENANTS, adapters=ADAPTERS) -> tuple[Tenancy, Registry]:
    registry = Registry(tmp_path / "registry.sqlite")
    registry.seed(tenants, adapters, lambda a: ("", 0, 0))
    return Tenancy(StaticView(registry.snapshot()), "base"), registry


@pytest.mark.parametrize(
    ("headers", "tenant"),
    [
        (["Bearer sk-a"], "acme"),
        (["bearer sk-a2"], "acme"),  # scheme is case-insensitive; both rotated keys work
        (["Bearer sk-g"], "globex"),
        (["Bearer sk-x"], None),
        (["sk-a"], None),  # no scheme
        (["Basic sk-a"], None),
        (["Bearer "], None),
        ([], None),
        (["Bearer sk-a", "Bearer sk-a"], None),  # two headers are refused, not resolved
    ],
)
def test_authentication(tmp_path, headers, tenant):
    tenancy, _ = tenancy_over(tmp_path)
    if tenant is None:
        with pytest.raises(Refused) as refused:
            tenancy.authenticate(headers)
        assert refused.value.status == 401
    else:
        assert tenancy.authenticate(headers).name == tenant


def test_a_disabled_tenant_is_refused_with_403(tmp_path):
    tenancy, registry = tenancy_over(tmp_path)
    registry.update_tenant("acme", disabled=True)
    tenancy.view.snapshot = registry.snapshot()
    with pytest.raises(Refused) as refused:
        tenancy.authenticate(["Bearer sk-a"])
    assert refused.value.status == 403


def test_keys_are_held_only_as_digests(tmp_path):
    tenancy, _ = tenancy_over(tmp_path)
    assert "sk-a" not in repr(tenancy.view.snapshot)
    assert "sk-a" not in (tmp_path / "registry.sqlite").read_bytes().decode("latin-1")


def test_names_are_local_to_a_tenant_and_others_adapters_do_not_exist(tmp_path):
    tenancy, _ = tenancy_over(tmp_path)
    acme = tenancy.authenticate(["Bearer sk-a"])
    globex = tenancy.authenticate(["Bearer sk-g"])
    assert tenancy.resolve(acme, "base") is None
    assert tenancy.resolve(acme, "support").uri == "/a"
    assert tenancy.resolve(globex, "support").uri == "/g"
    assert (
        tenancy.resolve(acme, "support").engine_name
        != tenancy.resolve(globex, "support").engine_name
    )
    assert tenancy.resolve(globex, "common").owner is None
    for name in ("legal", "nope"):  # another tenant's adapter reads as no such model
        with pytest.raises(Refused) as refused:
            tenancy.resolve(acme, name)
        assert refused.value.status == 404
    assert {a.name for a in tenancy.visible(acme)} == {"support", "common"}


def test_the_context_carries_the_adapter_version_and_the_tenant_share(tmp_path):
    tenancy, registry = tenancy_over(tmp_path)
    registry.update_tenant("acme", weight=3.0, priority="batch", limits={"requests_per_s": 2})
    tenancy.view.snapshot = registry.snapshot()
    acme = tenancy.authenticate(["Bearer sk-a"])
    context = acme.context(tenancy.resolve(acme, "support"))
    assert context.adapter.engine_name == "acme/support/v1" and context.adapter.uri == "/a"
    assert (context.tenant, context.weight, context.priority) == ("acme", 3.0, 1)
    assert acme.rate_limited and acme.limits.requests_per_s == 2
    assert acme.context(None).adapter is None


def test_demo_tenants_file_matches_the_demo_table(tmp_path):
    """tenants.demo.yaml holds digests; app.builtin_model.DEMO_TENANTS the clear demo keys."""
    from app.builtin_model import DEMO_TENANTS, SHARED_DEMO_ADAPTER

    root = Path(__file__).resolve().parents[2]
    cfg = AppConfig.from_args({"tenants_file": str(root / "tenants.demo.yaml")})
    tenancy, _ = tenancy_over(tmp_path, cfg.tenants, cfg.adapters)
    for demo in DEMO_TENANTS:
        caller = tenancy.authenticate([f"Bearer {demo.api_key}"])
        assert caller.name == demo.name
        assert {a.name for a in tenancy.visible(caller)} == {demo.adapter, SHARED_DEMO_ADAPTER}


def test_a_gateway_header_counts_only_with_the_gateway_secret(tmp_path):
    from starlette.datastructures import Headers

    from app.tenancy import GatewayTrust

    tenancy, _ = tenancy_over(tmp_path)
    tenancy.gateway = GatewayTrust("x-tenant-id", "x-gateway-secret", hash_api_key("gw-secret"))

    def caller(**headers):
        h = Headers(headers={k.replace("_", "-"): v for k, v in headers.items()})
        return tenancy.authenticate(h.getlist("authorization"), h)

    assert caller(x_tenant_id="globex", x_gateway_secret="gw-secret").name == "globex"
    # Without the right secret the header is ignored: the API key decides (here: none).
    for secret in ("wrong", None):
        headers = {"x_tenant_id": "globex"} | ({"x_gateway_secret": secret} if secret else {})
        with pytest.raises(Refused):
            caller(**headers)
    assert (
        caller(x_tenant_id="globex", x_gateway_secret="wrong", authorization="Bearer sk-a").name
        == "acme"
    )  # noqa: E501
    with pytest.raises(Refused):  # a tenant the registry does not know
        caller(x_tenant_id="nobody", x_gateway_secret="gw-secret")
