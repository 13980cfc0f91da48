"""The region catalog, plans, placement and the seed's host routing: pure
functions, no database."""

from __future__ import annotations

import pytest

from pgfleet.errors import NoCapacity, UnknownPlan, UnknownRegion
from pgfleet.regions import (
    REGION_IDS,
    PlacementPolicy,
    ServerLoad,
    choose_server,
    get_plan,
    get_region,
    get_regional_host,
)

US, EU, AP = "us-east-1", "eu-central-1", "ap-southeast-1"


def servers(*extra: ServerLoad) -> list[ServerLoad]:
    base = [
        ServerLoad(1, "us-a", US, capacity=10, tenants=3, is_primary=True),
        ServerLoad(2, "eu-a", EU, capacity=10, tenants=0, is_primary=True),
        ServerLoad(3, "ap-a", AP, capacity=10, tenants=0, is_primary=True),
    ]
    return base + list(extra)


def test_catalog_has_the_six_seed_regions_with_flags() -> None:
    flags = {r: get_region(r).flag for r in REGION_IDS}
    assert flags == {
        "us-east-1": "🇺🇸",
        "us-west-1": "🇺🇸",
        "eu-central-1": "🇪🇺",
        "eu-west-1": "🇪🇺",
        "ap-southeast-1": "🇸🇬",
        "ap-northeast-1": "🇯🇵",
    }
    assert get_region("ap-northeast-1").name == "Asia Pacific (Tokyo)"


def test_unknown_region_and_plan_name_the_valid_values() -> None:
    with pytest.raises(UnknownRegion) as e:
        get_region("mars-1")
    for r in REGION_IDS:
        assert r in str(e.value)
    with pytest.raises(UnknownPlan) as p:
        get_plan("gold")
    assert "free, pro, enterprise" in str(p.value)


def test_regional_policy_uses_the_requested_region() -> None:
    pl = choose_server(policy=PlacementPolicy.REGIONAL, region=EU, plan="free", servers=servers())
    assert (pl.server_name, pl.hosted_region) == ("eu-a", EU)


def test_metadata_only_region_falls_back_to_default() -> None:
    pl = choose_server(
        policy=PlacementPolicy.REGIONAL, region="eu-west-1", plan="pro", servers=servers()
    )
    assert pl.hosted_region == US
    assert "metadata-only" in pl.reason


def test_disabled_server_makes_region_metadata_only() -> None:
    load = [
        s if s.region != EU else ServerLoad(2, "eu-a", EU, 10, 0, True, enabled=False)
        for s in servers()
    ]
    pl = choose_server(policy=PlacementPolicy.REGIONAL, region=EU, plan="pro", servers=load)
    assert pl.hosted_region == US


def test_hybrid_free_on_default_primary_paid_in_region() -> None:
    extra = ServerLoad(4, "us-b", US, capacity=10, tenants=0, is_primary=False)
    free = choose_server(
        policy=PlacementPolicy.HYBRID, region=EU, plan="free", servers=servers(extra)
    )
    assert free.server_name == "us-a"  # the primary, though us-b is emptier
    paid = choose_server(
        policy=PlacementPolicy.HYBRID, region=EU, plan="pro", servers=servers(extra)
    )
    assert paid.server_name == "eu-a"


def test_single_policy_puts_everything_on_the_primary() -> None:
    for region in (EU, AP, "ap-northeast-1"):
        for plan in ("free", "enterprise"):
            pl = choose_server(
                policy=PlacementPolicy.SINGLE, region=region, plan=plan, servers=servers()
            )
            assert pl.server_name == "us-a"


def test_least_loaded_server_with_capacity_wins() -> None:
    load = [
        ServerLoad(1, "eu-a", EU, capacity=10, tenants=9, is_primary=True),
        ServerLoad(2, "eu-b", EU, capacity=100, tenants=20, is_primary=False),
        ServerLoad(3, "eu-c", EU, capacity=10, tenants=10, is_primary=False),
        ServerLoad(4, "us-a", US, capacity=10, tenants=0, is_primary=True),
    ]
    pl = choose_server(policy=PlacementPolicy.REGIONAL, region=EU, plan="free", servers=load)
    assert pl.server_name == "eu-b"


def test_full_region_is_refused_not_overfilled() -> None:
    load = [
        ServerLoad(1, "eu-a", EU, capacity=2, tenants=2, is_primary=True),
        ServerLoad(2, "us-a", US, capacity=2, tenants=0, is_primary=True),
    ]
    with pytest.raises(NoCapacity) as e:
        choose_server(policy=PlacementPolicy.REGIONAL, region=EU, plan="free", servers=load)
    assert EU in str(e.value)


def test_get_regional_host_seed_defaults_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("POSTGRES_HOST_US_EAST", "POSTGRES_HOST_EU", "POSTGRES_HOST_APAC"):
        monkeypatch.delenv(var, raising=False)
    assert get_regional_host(US) == "postgres-primary"
    assert get_regional_host(EU) == "postgres-eu"
    assert get_regional_host(AP) == "postgres-apac"
    assert get_regional_host("eu-west-1") == "postgres-primary"
    assert get_regional_host("nowhere-9") == "postgres-primary"


def test_get_regional_host_seed_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_HOST_US_EAST", "vpn-postgres")
    monkeypatch.setenv("POSTGRES_HOST_EU", "db-eu.example.internal")
    monkeypatch.setenv("POSTGRES_HOST_APAC", "db-apac.example.internal")
    assert get_regional_host(US) == "vpn-postgres"
    assert get_regional_host(EU) == "db-eu.example.internal"
    assert get_regional_host(AP) == "db-apac.example.internal"
    assert get_regional_host("us-west-1") == "vpn-postgres"
    # With a registry, the env still wins and unserved regions fall back.
    assert get_regional_host(EU, {US: "10.0.1.10"}) == "db-eu.example.internal"
    monkeypatch.delenv("POSTGRES_HOST_EU")
    assert get_regional_host(EU, {US: "10.0.1.10"}) == "vpn-postgres"
