"""ensure_tenant_database_provisioned and create_project against the real fleet:
placement, idempotence, convergence from every partial state, the security
properties of what gets created."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from psycopg import sql

from pgfleet.errors import Conflict, ProjectNotFound
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from pgfleet.regions import PLANS
from pgfleet.tenants.naming import tenant_db_name
from pgfleet.tenants.provisioning import (
    ensure_tenant_database_provisioned,
)
from pgfleet.tenants.service import create_project
from tests.helpers import FleetUnderTest
from tests.tenantdb import assert_converged, can_login, insert_tenant, object_oids

TENANT_NAME_RE = re.compile(r"^tenant_[0-9a-f]{8}(_[0-9a-f]{4}){3}_[0-9a-f]{12}(_rw|_ro)?$")


def tenant_row(platform: Platform, tid: uuid.UUID) -> dict[str, Any]:
    with platform.db.connection() as conn:
        cur = conn.execute(
            "SELECT row_to_json(t)::text FROM tenants t WHERE id = %s", (tid,)
        ).fetchone()
    assert cur is not None, f"no tenant row for {tid}"
    row: dict[str, Any] = json.loads(cur[0])
    row["_json_text"] = cur[0]
    return row


def test_create_project_places_database_on_requested_region_only(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, prov = create_project(
        platform, owner[0], name="shop", region="ap-southeast-1", plan_type="free"
    )
    assert prov.database == tenant_db_name(row.id)
    assert TENANT_NAME_RE.match(prov.database)
    assert row.status == "active"
    assert row.region == "ap-southeast-1"
    assert row.hosted_region == "ap-southeast-1"
    assert prov.hosted_region == "ap-southeast-1"
    assert_converged(fleet, "ap-southeast-1", prov)


def test_ensure_on_fresh_row_places_by_region(platform: Platform, fleet: FleetUnderTest) -> None:
    tid = insert_tenant(platform, "eu-central-1", "pro")
    prov = ensure_tenant_database_provisioned(tid, "eu-central-1", platform=platform)
    assert_converged(fleet, "eu-central-1", prov)
    row = tenant_row(platform, tid)
    assert row["status"] == "active"
    assert row["hosted_region"] == "eu-central-1"
    assert row["server_id"] is not None


def test_ensure_again_converges_and_keeps_password(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, first = create_project(
        platform, owner[0], name="again", region="eu-central-1", plan_type="free"
    )
    before = object_oids(fleet, "eu-central-1", first.database)
    second = ensure_tenant_database_provisioned(row.id, "eu-central-1", platform=platform)
    third = ensure_tenant_database_provisioned(row.id, "eu-central-1", platform=platform)
    for again in (second, third):
        assert again.password == first.password
        assert again.database == first.database
        assert again.server == first.server
        assert again.ro_password == first.ro_password
    assert object_oids(fleet, "eu-central-1", first.database) == before, "objects were recreated"
    assert can_login(first)
    assert can_login(first, ro=True)
    assert_converged(fleet, "eu-central-1", third)


def test_ensure_concurrent_calls_converge(platform: Platform, fleet: FleetUnderTest) -> None:
    tid = insert_tenant(platform, "us-east-1")
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(
                lambda _: ensure_tenant_database_provisioned(tid, "us-east-1", platform=platform),
                range(4),
            )
        )
    assert len({r.password for r in results}) == 1, (
        "concurrent calls ended with different passwords"
    )
    assert_converged(fleet, "us-east-1", results[-1])


def test_ensure_unknown_tenant_and_wrong_region(platform: Platform) -> None:
    with pytest.raises(ProjectNotFound):
        ensure_tenant_database_provisioned(uuid.uuid4(), "us-east-1", platform=platform)
    tid = insert_tenant(platform, "eu-central-1")
    with pytest.raises(Conflict):
        ensure_tenant_database_provisioned(tid, "us-east-1", platform=platform)


@pytest.mark.parametrize("plan", PLANS, ids=[p.id for p in PLANS])
def test_connection_limit_matches_plan(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest, plan: Any
) -> None:
    _, prov = create_project(
        platform, owner[0], name=f"plan {plan.id}", region="us-east-1", plan_type=plan.id
    )
    for role in (prov.user, prov.ro_user):
        with fleet.admin_conn("us-east-1") as a:
            limit = a.execute(
                "SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (role,)
            ).fetchone()
            settings = a.execute(
                "SELECT s.setconfig FROM pg_db_role_setting s "
                "JOIN pg_roles r ON r.oid = s.setrole WHERE r.rolname = %s AND s.setdatabase = 0",
                (role,),
            ).fetchone()
        assert limit == ({"free": 10, "pro": 60, "enterprise": 200}[plan.id],), role
        assert settings is not None, role
        assert f"statement_timeout={plan.statement_timeout_ms}ms" in settings[0], role
        read_only = "default_transaction_read_only=on" in settings[0]
        assert read_only == (role == prov.ro_user), (role, settings[0])


def test_connection_info_holds_no_cleartext_password(
    platform: Platform, owner: tuple[Owner, str]
) -> None:
    project, prov = create_project(
        platform, owner[0], name="secret", region="eu-central-1", plan_type="free"
    )
    row = tenant_row(platform, project.id)
    info = row["connection_info"]
    assert info["password_enc"]
    assert "password" not in info
    assert info["user"] == prov.user and info["database"] == prov.database
    assert info["ro_user"] == prov.ro_user
    assert info["port"] == prov.port
    assert prov.password not in row["_json_text"]
    assert prov.ro_password not in row["_json_text"]
    assert platform.secrets.decrypt(info["password_enc"]) == prov.password
    assert platform.secrets.decrypt(info["ro_password_enc"]) == prov.ro_password


def test_metadata_only_region_is_hosted_in_default_region(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    assert "us-west-1" not in fleet.regions()
    project, prov = create_project(
        platform, owner[0], name="west", region="us-west-1", plan_type="pro"
    )
    assert project.region == "us-west-1"
    assert project.hosted_region == "us-east-1"
    assert prov.region == "us-west-1"
    assert prov.hosted_region == "us-east-1"
    row = tenant_row(platform, project.id)
    assert (row["region"], row["hosted_region"]) == ("us-west-1", "us-east-1")
    assert row["connection_info"]["hosted_region"] == "us-east-1"
    assert "metadata-only" in row["placement_reason"]
    assert_converged(fleet, "us-east-1", prov)


def test_hybrid_placement(platform_factory: Any, fleet: FleetUnderTest) -> None:
    from pgfleet.auth import create_owner

    platform: Platform = platform_factory(placement="hybrid")
    who, _ = create_owner(platform, "hybrid")
    free, free_db = create_project(
        platform, who, name="free one", region="eu-central-1", plan_type="free"
    )
    pro, pro_db = create_project(
        platform, who, name="pro one", region="eu-central-1", plan_type="pro"
    )
    assert (free.region, free.hosted_region) == ("eu-central-1", "us-east-1")
    assert (pro.region, pro.hosted_region) == ("eu-central-1", "eu-central-1")
    assert_converged(fleet, "us-east-1", free_db)
    assert_converged(fleet, "eu-central-1", pro_db)


def test_single_placement(platform_factory: Any, fleet: FleetUnderTest) -> None:
    from pgfleet.auth import create_owner

    platform: Platform = platform_factory(placement="single")
    who, _ = create_owner(platform, "single")
    for region, plan in (
        ("eu-central-1", "pro"),
        ("ap-southeast-1", "enterprise"),
        ("us-west-1", "free"),
    ):
        project, prov = create_project(
            platform, who, name=f"{region} {plan}", region=region, plan_type=plan
        )
        assert project.region == region
        assert project.hosted_region == "us-east-1"
        assert_converged(fleet, "us-east-1", prov)


def test_hostile_name_is_stored_verbatim_and_never_reaches_servers(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    name = 'Robert\'); DROP TABLE tenants; -- "Zoë" ünïcødé 日本語 🐘🚀 $$ ; \\x'
    project, prov = create_project(
        platform, owner[0], name=name, region="eu-central-1", plan_type="free"
    )
    assert project.name == name
    assert tenant_row(platform, project.id)["name"] == name
    assert_converged(fleet, "eu-central-1", prov)
    fragments = ("Robert", "DROP", "Zoë", "ünïcødé", "日本語", "🐘", "🚀")
    for region in fleet.regions():
        with fleet.admin_conn(region) as a:
            names = [
                r[0]
                for r in a.execute(
                    "SELECT datname::text FROM pg_database UNION ALL "
                    "SELECT rolname::text FROM pg_roles UNION ALL "
                    "SELECT coalesce(description, '') FROM pg_shdescription"
                )
            ]
        for n in names:
            assert not any(f in n for f in fragments), f"customer name leaked on {region}: {n!r}"
        for n in fleet.databases(region) | fleet.roles(region):
            assert TENANT_NAME_RE.match(n), f"non-opaque tenant object {n!r} on {region}"


def test_server_statement_log_never_sees_cleartext_password(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    region = "ap-southeast-1"
    log = fleet.fleet.log_file(fleet.server(region).name)
    admin_user = fleet.fleet.conninfo(fleet.server(region))["user"]
    start = log.stat().st_size
    with fleet.admin_conn(region) as a:
        # New admin sessions (pgfleet's pool connects lazily) log every statement.
        a.execute(
            sql.SQL("ALTER ROLE {} SET log_statement = 'all'").format(sql.Identifier(admin_user))
        )
    try:
        row, prov = create_project(
            platform, owner[0], name="logged", region=region, plan_type="free"
        )
        wanted = "Visible-" + secrets.token_hex(12)
        ensure_tenant_database_provisioned(
            row.id, region, desired_password=wanted, platform=platform
        )
    finally:
        with fleet.admin_conn(region) as a:
            a.execute(
                sql.SQL("ALTER ROLE {} RESET log_statement").format(sql.Identifier(admin_user))
            )
    with log.open("rb") as f:
        f.seek(start)
        written = f.read().decode("utf-8", "replace")
    # CREATE ROLE on the slow path, ALTER ROLE ... RENAME TO for a prepared spare.
    assert f'ROLE "{prov.user}"' in written or f'TO "{prov.user}"' in written, (
        "statement logging did not take effect; the check below would prove nothing"
    )
    assert prov.password not in written
    assert prov.ro_password not in written
    assert wanted not in written


def test_admin_sessions_never_wait_unbounded(platform: Platform) -> None:
    """A DDL step queued behind a tenant's lock fails after lock_timeout (its
    operation retries it with backoff) rather than hanging."""
    server = next(s for s in platform.servers.all() if s.region == "us-east-1")
    with platform.servers.admin_connection(server) as conn:
        lock = conn.execute("SHOW lock_timeout").fetchone()
        stmt = conn.execute("SHOW statement_timeout").fetchone()
    assert lock == ("10s",) and stmt == ("5min",)
