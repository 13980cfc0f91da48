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

import psycopg
import pytest
from psycopg import sql

from pgfleet.errors import Conflict, ProjectNotFound
from pgfleet.platform.core import Platform
from pgfleet.regions import PLANS
from pgfleet.tenants.provisioning import (
    ProvisionedDatabase,
    ensure_tenant_database_provisioned,
    tenant_db_name,
)
from pgfleet.tenants.service import Owner, create_project
from tests.conftest import FleetUnderTest

TENANT_NAME_RE = re.compile(r"^tenant_[0-9a-f]{8}(_[0-9a-f]{4}){3}_[0-9a-f]{12}(_ro)?$")


# ---- helpers -------------------------------------------------------------------


def insert_tenant(platform: Platform, region: str, plan: str = "free") -> uuid.UUID:
    """A tenant row with no placement yet, as the seed's callers create it."""
    tid = uuid.uuid4()
    with platform.db.connection() as conn:
        conn.execute(
            "INSERT INTO tenants (id, name, region, plan_type, status) "
            "VALUES (%s, %s, %s, %s, 'provisioning')",
            (tid, f"row {tid.hex[:6]}", region, plan),
        )
    return tid


def tenant_row(platform: Platform, tid: uuid.UUID) -> dict[str, Any]:
    with platform.db.connection() as conn:
        cur = conn.execute(
            "SELECT row_to_json(t)::text FROM tenants t WHERE id = %s", (tid,)
        ).fetchone()
    assert cur is not None, f"no tenant row for {tid}"
    row: dict[str, Any] = json.loads(cur[0])
    row["_json_text"] = cur[0]
    return row


def connect_as(
    prov: ProvisionedDatabase,
    password: str | None = None,
    dbname: str | None = None,
    *,
    ro: bool = False,
) -> psycopg.Connection[Any]:
    default_password = prov.ro_password if ro else prov.password
    return psycopg.connect(
        host=prov.host,
        port=prov.port,
        dbname=dbname or prov.database,
        user=prov.ro_user if ro else prov.user,
        password=default_password if password is None else password,
        sslmode=prov.sslmode,
        connect_timeout=5,
        autocommit=True,
    )


def can_login(prov: ProvisionedDatabase, password: str | None = None, *, ro: bool = False) -> bool:
    try:
        with connect_as(prov, password, ro=ro) as c:
            row = c.execute("SELECT current_user::text, current_database()::text").fetchone()
            assert row == (prov.ro_user if ro else prov.user, prov.database)
            return True
    except psycopg.OperationalError as e:
        assert "password authentication failed" in str(e), e
        return False


def object_oids(fleet: FleetUnderTest, region: str, name: str) -> tuple[Any, Any]:
    """(oid of database `name`, oid of role `name`): unchanged means not recreated."""
    with fleet.admin_conn(region) as a:
        db = a.execute("SELECT oid FROM pg_database WHERE datname = %s", (name,)).fetchone()
        role = a.execute("SELECT oid FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
    return db, role


def hosting_regions(fleet: FleetUnderTest, name: str) -> tuple[set[str], set[str]]:
    """(regions whose server has database `name`, regions whose server has role `name`)."""
    dbs = {r for r in fleet.regions() if name in fleet.databases(r)}
    roles = {r for r in fleet.regions() if name in fleet.roles(r)}
    return dbs, roles


def assert_converged(fleet: FleetUnderTest, region: str, prov: ProvisionedDatabase) -> None:
    """Database and roles exist on `region`'s server only, as the rules want."""
    name = prov.database
    assert prov.user == name
    assert prov.ro_user and prov.ro_user != name
    assert hosting_regions(fleet, name) == ({region}, {region})
    assert hosting_regions(fleet, prov.ro_user)[1] == {region}
    assert prov.port == fleet.server(region).port
    with fleet.admin_conn(region) as a:
        db = a.execute(
            "SELECT pg_get_userbyid(datdba), datconnlimit, datallowconn FROM pg_database "
            "WHERE datname = %s",
            (name,),
        ).fetchone()
        assert db is not None
        owner, connlimit, allowconn = db
        assert owner == name, "the database must be owned by the project's role"
        assert connlimit != -2, "the database is still marked invalid"
        assert allowconn
        public_connect = a.execute(
            "SELECT count(*) FROM pg_database d, "
            "aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) acl "
            "WHERE d.datname = %s AND acl.grantee = 0 AND acl.privilege_type = 'CONNECT'",
            (name,),
        ).fetchone()
        assert public_connect == (0,), "PUBLIC still has CONNECT on the tenant database"
        for role_name in (name, prov.ro_user):
            role = a.execute(
                "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, "
                "rolbypassrls, left(rolpassword, 14) FROM pg_authid WHERE rolname = %s",
                (role_name,),
            ).fetchone()
            assert role == (True, False, False, False, False, False, "SCRAM-SHA-256$"), role_name
        # Exactly the project's two roles may connect; no other tenant role may.
        connectors = {
            r[0]
            for r in a.execute(
                "SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'tenant\\_%%' "
                "AND has_database_privilege(oid, %s, 'CONNECT')",
                (name,),
            )
        }
        assert connectors == {name, prov.ro_user}
    assert can_login(prov), "the provisioned credentials do not log in"
    assert can_login(prov, ro=True), "the read-only credentials do not log in"
    with connect_as(prov, ro=True) as c, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        c.execute("CREATE TABLE ro_probe (x int)")


# ---- basic provisioning ----------------------------------------------------------


def test_create_project_places_database_on_requested_region_only(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, prov = create_project(
        platform, owner[0], name="shop", region="ap-southeast-1", plan_type="free"
    )
    assert prov.database == tenant_db_name(row["id"])
    assert TENANT_NAME_RE.match(prov.database)
    assert row["status"] == "active"
    assert row["region"] == "ap-southeast-1"
    assert row["hosted_region"] == "ap-southeast-1"
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
    second = ensure_tenant_database_provisioned(row["id"], "eu-central-1", platform=platform)
    third = ensure_tenant_database_provisioned(row["id"], "eu-central-1", platform=platform)
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


# ---- convergence from partial states ----------------------------------------------


def test_role_without_database_converges(platform: Platform, fleet: FleetUnderTest) -> None:
    tid = insert_tenant(platform, "eu-central-1")
    name = tenant_db_name(tid)
    with fleet.admin_conn("eu-central-1") as a:
        a.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'leftover'").format(sql.Identifier(name)))
    prov = ensure_tenant_database_provisioned(tid, "eu-central-1", platform=platform)
    assert prov.password != "leftover"
    assert_converged(fleet, "eu-central-1", prov)
    assert not can_login(prov, "leftover")


def test_role_without_database_after_create_converges(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, prov = create_project(
        platform, owner[0], name="lostdb", region="us-east-1", plan_type="free"
    )
    with fleet.admin_conn("us-east-1") as a:
        a.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(prov.database)))
    again = ensure_tenant_database_provisioned(row["id"], "us-east-1", platform=platform)
    assert again.password == prov.password
    assert_converged(fleet, "us-east-1", again)


def test_database_without_role_converges(platform: Platform, fleet: FleetUnderTest) -> None:
    tid = insert_tenant(platform, "eu-central-1")
    name = tenant_db_name(tid)
    with fleet.admin_conn("eu-central-1") as a:
        a.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        owner = a.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        assert owner is not None and owner[0] != name
        db_oid = a.execute("SELECT oid FROM pg_database WHERE datname = %s", (name,)).fetchone()
    prov = ensure_tenant_database_provisioned(tid, "eu-central-1", platform=platform)
    assert_converged(fleet, "eu-central-1", prov)
    # The existing database was adopted, not dropped and recreated.
    assert object_oids(fleet, "eu-central-1", name)[0] == db_oid


def test_wrong_role_password_converges(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, prov = create_project(
        platform, owner[0], name="pw", region="ap-southeast-1", plan_type="pro"
    )
    with fleet.admin_conn("ap-southeast-1") as a:
        a.execute(sql.SQL("ALTER ROLE {} PASSWORD 'x'").format(sql.Identifier(prov.user)))
    assert not can_login(prov), "the sabotage did not take"
    again = ensure_tenant_database_provisioned(row["id"], "ap-southeast-1", platform=platform)
    assert again.password == prov.password
    assert can_login(prov)
    assert not can_login(prov, "x")
    assert_converged(fleet, "ap-southeast-1", again)


def test_role_with_wrong_attributes_converges(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, prov = create_project(
        platform, owner[0], name="attrs", region="eu-central-1", plan_type="pro"
    )
    with fleet.admin_conn("eu-central-1") as a:
        a.execute(
            sql.SQL(
                "ALTER ROLE {} NOLOGIN SUPERUSER CREATEDB CREATEROLE REPLICATION BYPASSRLS "
                "CONNECTION LIMIT 1"
            ).format(sql.Identifier(prov.user))
        )
    again = ensure_tenant_database_provisioned(row["id"], "eu-central-1", platform=platform)
    assert_converged(fleet, "eu-central-1", again)
    with fleet.admin_conn("eu-central-1") as a:
        limit = a.execute(
            "SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (prov.user,)
        ).fetchone()
    assert limit == (60,)


def test_lost_read_only_role_converges(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, prov = create_project(
        platform, owner[0], name="ro lost", region="us-east-1", plan_type="free"
    )
    with connect_as(prov) as c:
        c.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
    ro = sql.Identifier(prov.ro_user)
    # DROP OWNED revokes what was granted to the role (in that database and on
    # shared objects), so the role itself can then go.
    with psycopg.connect(
        **fleet.fleet.conninfo(fleet.server("us-east-1"), prov.database), autocommit=True
    ) as in_db:
        in_db.execute(sql.SQL("DROP OWNED BY {}").format(ro))
    with fleet.admin_conn("us-east-1") as a:
        a.execute(sql.SQL("DROP ROLE {}").format(ro))
    assert prov.ro_user not in fleet.roles("us-east-1")
    again = ensure_tenant_database_provisioned(row["id"], "us-east-1", platform=platform)
    assert again.ro_password == prov.ro_password
    assert_converged(fleet, "us-east-1", again)
    with connect_as(again, ro=True) as c:
        assert c.execute("SELECT x FROM kept").fetchall() == [(7,)]


def test_database_owned_by_another_role_converges(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, prov = create_project(
        platform, owner[0], name="owned", region="eu-central-1", plan_type="free"
    )
    # tenant_-prefixed so the fixture's wipe removes it whatever happens.
    squatter = f"tenant_squatter_{secrets.token_hex(4)}"
    with fleet.admin_conn("eu-central-1") as a:
        a.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(squatter)))
        a.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(prov.database), sql.Identifier(squatter)
            )
        )
    again = ensure_tenant_database_provisioned(row["id"], "eu-central-1", platform=platform)
    assert_converged(fleet, "eu-central-1", again)


def test_half_dropped_database_converges(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, prov = create_project(
        platform, owner[0], name="halfdrop", region="us-east-1", plan_type="free"
    )
    with connect_as(prov) as c:
        c.execute("CREATE TABLE leftover (x int)")
    with fleet.admin_conn("us-east-1") as a:
        # What an interrupted DROP DATABASE leaves behind.
        a.execute("UPDATE pg_database SET datconnlimit = -2 WHERE datname = %s", (prov.database,))
    with pytest.raises(psycopg.OperationalError):
        connect_as(prov).close()
    again = ensure_tenant_database_provisioned(row["id"], "us-east-1", platform=platform)
    assert_converged(fleet, "us-east-1", again)
    with connect_as(again) as c:
        assert c.execute("SELECT to_regclass('leftover')").fetchone() == (None,)


def test_desired_password_is_applied(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, prov = create_project(
        platform, owner[0], name="rotate", region="eu-central-1", plan_type="free"
    )
    wanted = "N3w-" + secrets.token_urlsafe(18) + "'\";$"
    again = ensure_tenant_database_provisioned(
        row["id"], "eu-central-1", desired_password=wanted, platform=platform
    )
    assert again.password == wanted
    assert can_login(again)
    assert not can_login(prov), "the old password still works"
    assert platform.client.endpoint(row["id"]).password == wanted
    # A later call without a desired password keeps the stored one.
    later = ensure_tenant_database_provisioned(row["id"], "eu-central-1", platform=platform)
    assert later.password == wanted
    assert_converged(fleet, "eu-central-1", later)


# ---- what gets created ------------------------------------------------------------


@pytest.mark.parametrize("plan", PLANS, ids=[p.id for p in PLANS])
def test_connection_limit_matches_plan(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest, plan: Any
) -> None:
    _, prov = create_project(
        platform, owner[0], name=f"plan {plan.id}", region="us-east-1", plan_type=plan.id
    )
    with fleet.admin_conn("us-east-1") as a:
        limit = a.execute(
            "SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (prov.user,)
        ).fetchone()
        settings = a.execute(
            "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
            "WHERE r.rolname = %s AND s.setdatabase = 0",
            (prov.user,),
        ).fetchone()
    assert limit == ({"free": 10, "pro": 60, "enterprise": 200}[plan.id],)
    assert settings is not None
    assert f"statement_timeout={plan.statement_timeout_ms}ms" in settings[0]


def test_connection_info_holds_no_cleartext_password(
    platform: Platform, owner: tuple[Owner, str]
) -> None:
    project, prov = create_project(
        platform, owner[0], name="secret", region="eu-central-1", plan_type="free"
    )
    row = tenant_row(platform, project["id"])
    info = row["connection_info"]
    assert info["password_enc"]
    assert "password" not in info
    assert info["user"] == prov.user and info["database"] == prov.database
    assert info["port"] == prov.port
    assert prov.password not in row["_json_text"]
    assert platform.secrets.decrypt(info["password_enc"]) == prov.password


def test_metadata_only_region_is_hosted_in_default_region(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    assert "us-west-1" not in fleet.regions()
    project, prov = create_project(
        platform, owner[0], name="west", region="us-west-1", plan_type="pro"
    )
    assert project["region"] == "us-west-1"
    assert project["hosted_region"] == "us-east-1"
    assert prov.region == "us-west-1"
    assert prov.hosted_region == "us-east-1"
    row = tenant_row(platform, project["id"])
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
    assert (free["region"], free["hosted_region"]) == ("eu-central-1", "us-east-1")
    assert (pro["region"], pro["hosted_region"]) == ("eu-central-1", "eu-central-1")
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
        assert project["region"] == region
        assert project["hosted_region"] == "us-east-1"
        assert_converged(fleet, "us-east-1", prov)


def test_hostile_name_is_stored_verbatim_and_never_reaches_servers(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    name = 'Robert\'); DROP TABLE tenants; -- "Zoë" ünïcødé 日本語 🐘🚀 $$ ; \\x'
    project, prov = create_project(
        platform, owner[0], name=name, region="eu-central-1", plan_type="free"
    )
    assert project["name"] == name
    assert tenant_row(platform, project["id"])["name"] == name
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
            row["id"], region, desired_password=wanted, platform=platform
        )
    finally:
        with fleet.admin_conn(region) as a:
            a.execute(
                sql.SQL("ALTER ROLE {} RESET log_statement").format(sql.Identifier(admin_user))
            )
    with log.open("rb") as f:
        f.seek(start)
        written = f.read().decode("utf-8", "replace")
    assert f'CREATE ROLE "{prov.user}"' in written or f"CREATE ROLE {prov.user}" in written, (
        "statement logging did not take effect; the check below would prove nothing"
    )
    assert prov.password not in written
    assert prov.ro_password not in written
    assert wanted not in written
