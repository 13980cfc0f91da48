"""Settings: pgfleet.toml external servers, the seed's env names, failing fast."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pgfleet.config import Settings


def test_toml_servers_and_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "pgfleet.toml"
    cfg.write_text(
        'placement = "hybrid"\n'
        "[[servers]]\n"
        'name = "eu-1"\nregion = "eu-central-1"\nhost = "db-eu.internal"\nport = 6432\n'
        'admin_user = "platform_admin"\nadmin_password = "s3cret"\nsslmode = "require"\n'
        "capacity = 300\nprimary = true\n"
        "[[servers]]\n"
        'name = "us-1"\nregion = "us-east-1"\nhost = "db-us.internal"\n'
        'admin_password = "other"\n'
    )
    monkeypatch.setenv("PGFLEET_CONFIG", str(cfg))
    s = Settings()
    assert s.placement == "hybrid"
    assert not s.embedded
    eu = next(x for x in s.external_servers() if x.name == "eu-1")
    assert (eu.host, eu.port, eu.sslmode, eu.capacity) == ("db-eu.internal", 6432, "require", 300)
    # secrets never show in reprs
    assert "s3cret" not in repr(s) and "s3cret" not in repr(eu)
    assert eu.admin_password.get_secret_value() == "s3cret"


def test_toml_rejects_unknown_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "pgfleet.toml"
    cfg.write_text('[[servers]]\nname = "x"\nregion = "mars-1"\nhost = "h"\n')
    monkeypatch.setenv("PGFLEET_CONFIG", str(cfg))
    with pytest.raises(ValidationError) as e:
        Settings()
    assert "mars-1" in str(e.value) and "eu-central-1" in str(e.value)


def test_seed_env_vars_define_per_region_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_HOST_EU", "db-eu.internal")
    monkeypatch.setenv("POSTGRES_ADMIN_PASSWORD_EU", "eu-pass")
    monkeypatch.setenv("POSTGRES_HOST_US_EAST", "vpn-postgres")
    monkeypatch.setenv("POSTGRES_ADMIN_PASSWORD_US_EAST", "us-pass")
    s = Settings()
    by_region = {x.region: x for x in s.external_servers()}
    assert by_region["eu-central-1"].host == "db-eu.internal"
    assert by_region["eu-central-1"].admin_password.get_secret_value() == "eu-pass"
    assert by_region["us-east-1"].admin_password.get_secret_value() == "us-pass"
    assert not s.embedded


def test_production_requires_secret_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGFLEET_ENVIRONMENT", "production")
    with pytest.raises(ValidationError) as e:
        Settings()
    assert "PGFLEET_SECRET_KEYS" in str(e.value)


def test_embedded_regions_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGFLEET_EMBEDDED_REGIONS", "us-east-1, eu-west-1")
    assert Settings().embedded_regions == ["us-east-1", "eu-west-1"]
    monkeypatch.setenv("PGFLEET_EMBEDDED_REGIONS", "us-east-1,atlantis-1")
    with pytest.raises(ValidationError):
        Settings()


def test_tenant_pool_cap_is_shared_by_the_api_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    from pgfleet.config import Settings

    s = Settings(tenant_pool_cap=64, api_workers=2)
    assert s.tenant_pool_cap_per_process == 32
    assert Settings(tenant_pool_cap=3, api_workers=4).tenant_pool_cap_per_process == 1
    monkeypatch.delenv("PGFLEET_API_WORKERS", raising=False)
    assert 1 <= Settings().api_workers <= 4
