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
from pgfleet.platform.owners import Owner
from pgfleet.regions import PLANS
from pgfleet.tenants.naming import tenant_db_name
from pgfleet.tenants.provisioning import (
    ProvisionedDatabase,
    ensure_tenant_database_provisioned,
)
from pgfleet.tenants.service import create_project
from tests.helpers import FleetUnderTest, tenant_client

TENANT_NAME_RE = re.compile(r"^tenant_[0-9a-f]{8}(_[0-9a-f]{4}){3}_[0-9a-f]{12}(_rw|_ro)?$")
HBA_REJECTS = "pg_hba.conf rejects connection"


# ---- helpers -------------------------------------------------------------------


def project_roles(name: str) -> tuple[str, str, str]:
    """(gate, rw, ro): the NOLOGIN role named like the database, and the two login roles."""
    return name, f"{name}_rw", f"{name}_ro"


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
        sslrootcert=prov.sslrootcert,
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


def object_oids_of_role(fleet: FleetUnderTest, region: str, role: str) -> Any:
    with fleet.admin_conn(region) as a:
        return a.execute("SELECT oid FROM pg_roles WHERE rolname = %s", (role,)).fetchone()


def object_oids(fleet: FleetUnderTest, region: str, name: str) -> tuple[Any, ...]:
    """(oid of database `name`, oids of its gate, rw and ro roles): unchanged means not
    recreated."""
    with fleet.admin_conn(region) as a:
        db = a.execute("SELECT oid FROM pg_database WHERE datname = %s", (name,)).fetchone()
        roles = tuple(
            a.execute("SELECT oid FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            for role in project_roles(name)
        )
    assert db is not None and None not in roles, (db, roles)
    return (db, *roles)


def login_error(
    prov: ProvisionedDatabase,
    *,
    user: str | None = None,
    password: str | None = None,
    dbname: str | None = None,
) -> str:
    """The server's reason for refusing a login (fails if the login is accepted)."""
    try:
        psycopg.connect(
            host=prov.host,
            port=prov.port,
            dbname=dbname or prov.database,
            user=user or prov.user,
            password=prov.password if password is None else password,
            sslmode=prov.sslmode,
            sslrootcert=prov.sslrootcert,
            connect_timeout=5,
        ).close()
    except psycopg.OperationalError as e:
        return str(e)
    raise AssertionError(f"{user or prov.user} logged into {dbname or prov.database}")


def in_tenant_db(prov: ProvisionedDatabase) -> psycopg.Connection[Any]:
    """A session inside the project's database as its own rw role (the catalog
    is readable by anyone; the admin may not enter a tenant's database)."""
    return connect_as(prov)


def assert_gate_inert(fleet: FleetUnderTest, region: str, prov: ProvisionedDatabase) -> None:
    """The gate role can do nothing: no login, no password, owns nothing, granted nothing."""
    name = prov.database
    gate, rw, ro = project_roles(name)
    with fleet.admin_conn(region) as a:
        role = a.execute(
            "SELECT oid, rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, "
            "rolbypassrls, rolpassword FROM pg_authid WHERE rolname = %s",
            (gate,),
        ).fetchone()
        assert role is not None, f"no gate role {gate}"
        oid = role[0]
        assert role[1:] == (False, False, False, False, False, False, None), role
        owned_dbs = a.execute(
            "SELECT datname::text FROM pg_database WHERE datdba = %s", (oid,)
        ).fetchall()
        assert owned_dbs == [], f"the gate owns databases {owned_dbs}"
        own_acl = a.execute(
            "SELECT acl.privilege_type FROM pg_database d, "
            "aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) acl "
            "WHERE d.datname = %s AND acl.grantee = %s",
            (name, oid),
        ).fetchall()
        assert own_acl == [], f"the gate holds {own_acl} on its database"
        assert a.execute(
            "SELECT has_database_privilege(%s, %s, 'CONNECT')", (gate, name)
        ).fetchone() == (False,)
        # Shared dependencies record every owner and grantee, in every database.
        deps = a.execute(
            "SELECT d.datname::text, s.classid::regclass::text, s.deptype FROM pg_shdepend s "
            "LEFT JOIN pg_database d ON d.oid = s.dbid "
            "WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = %s",
            (oid,),
        ).fetchall()
        assert deps == [], f"the gate owns or is granted {deps}"
        members = {
            r[0]
            for r in a.execute(
                "SELECT m.rolname::text FROM pg_auth_members am "
                "JOIN pg_roles m ON m.oid = am.member WHERE am.roleid = %s",
                (oid,),
            )
        }
        assert members == {rw, ro}, f"gate members {members}"
        member_of = a.execute(
            "SELECT roleid::regrole::text FROM pg_auth_members WHERE member = %s", (oid,)
        ).fetchall()
        assert member_of == [], f"the gate inherits from {member_of}"
    with in_tenant_db(prov) as t:
        owned = t.execute(
            "SELECT 'class ' || relname FROM pg_class WHERE relowner = %(o)s "
            "UNION ALL SELECT 'schema ' || nspname FROM pg_namespace WHERE nspowner = %(o)s "
            "UNION ALL SELECT 'function ' || proname FROM pg_proc WHERE proowner = %(o)s "
            "UNION ALL SELECT 'type ' || typname FROM pg_type WHERE typowner = %(o)s "
            "UNION ALL SELECT 'default acl' FROM pg_default_acl WHERE defaclrole = %(o)s",
            {"o": oid},
        ).fetchall()
        assert owned == [], f"the gate owns {owned} in its database"


def hosting_regions(fleet: FleetUnderTest, name: str) -> tuple[set[str], set[str]]:
    """(regions whose server has database `name`, regions whose server has role `name`)."""
    dbs = {r for r in fleet.regions() if name in fleet.databases(r)}
    roles = {r for r in fleet.regions() if name in fleet.roles(r)}
    return dbs, roles


def assert_converged(fleet: FleetUnderTest, region: str, prov: ProvisionedDatabase) -> None:
    """Database and roles exist on `region`'s server only, as the rules want."""
    name = prov.database
    gate, rw, ro = project_roles(name)
    assert (prov.user, prov.ro_user) == (rw, ro)
    assert hosting_regions(fleet, name) == ({region}, {region})
    assert hosting_regions(fleet, rw)[1] == {region}
    assert hosting_regions(fleet, ro)[1] == {region}
    assert prov.port == fleet.server(region).port
    with fleet.admin_conn(region) as a:
        db = a.execute(
            "SELECT pg_get_userbyid(datdba), datconnlimit, datallowconn FROM pg_database "
            "WHERE datname = %s",
            (name,),
        ).fetchone()
        assert db is not None
        owner, connlimit, allowconn = db
        assert owner == rw, "the database must be owned by the project's rw role"
        assert connlimit != -2, "the database is still marked invalid"
        assert allowconn
        public_connect = a.execute(
            "SELECT count(*) FROM pg_database d, "
            "aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) acl "
            "WHERE d.datname = %s AND acl.grantee = 0 AND acl.privilege_type = 'CONNECT'",
            (name,),
        ).fetchone()
        assert public_connect == (0,), "PUBLIC still has CONNECT on the tenant database"
        for role_name in (rw, ro):
            role = a.execute(
                "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, "
                "rolbypassrls, left(rolpassword, 14) FROM pg_authid WHERE rolname = %s",
                (role_name,),
            ).fetchone()
            assert role == (True, False, False, False, False, False, "SCRAM-SHA-256$"), role_name
        # Exactly the project's two login roles are members of the gate (so pg_hba
        # admits them), and they belong to nothing else.
        for login in (rw, ro):
            member_of = {
                r[0]
                for r in a.execute(
                    "SELECT g.rolname::text FROM pg_auth_members am "
                    "JOIN pg_roles g ON g.oid = am.roleid JOIN pg_roles m ON m.oid = am.member "
                    "WHERE m.rolname = %s",
                    (login,),
                )
            }
            assert member_of == {gate}, f"{login} is a member of {member_of}"
        # Exactly the project's login roles may connect; no other tenant role may.
        connectors = {
            r[0]
            for r in a.execute(
                "SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'tenant\\_%%' "
                "AND has_database_privilege(oid, %s, 'CONNECT')",
                (name,),
            )
        }
        assert connectors == {rw, ro}
    assert_gate_inert(fleet, region, prov)
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


# ---- convergence from partial states ----------------------------------------------


@pytest.mark.parametrize("leftover", ["rw", "ro", "gate"])
def test_role_without_database_converges(
    platform: Platform, fleet: FleetUnderTest, leftover: str
) -> None:
    """One role left over, alone, with a password nobody knows (for the gate: what the
    old two-role scheme left, a login role named like the database)."""
    tid = insert_tenant(platform, "eu-central-1")
    name = tenant_db_name(tid)
    gate, rw, ro = project_roles(name)
    role = {"rw": rw, "ro": ro, "gate": gate}[leftover]
    with fleet.admin_conn("eu-central-1") as a:
        a.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'leftover'").format(sql.Identifier(role)))
    before = object_oids_of_role(fleet, "eu-central-1", role)
    prov = ensure_tenant_database_provisioned(tid, "eu-central-1", platform=platform)
    assert "leftover" not in (prov.password, prov.ro_password)
    assert_converged(fleet, "eu-central-1", prov)
    assert object_oids_of_role(fleet, "eu-central-1", role) == before, "the role was recreated"
    assert "password authentication failed" in login_error(prov, user=role, password="leftover")


def test_role_without_database_after_create_converges(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, prov = create_project(
        platform, owner[0], name="lostdb", region="us-east-1", plan_type="free"
    )
    with fleet.admin_conn("us-east-1") as a:
        a.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(prov.database)))
    again = ensure_tenant_database_provisioned(row.id, "us-east-1", platform=platform)
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
        assert owner is not None and owner[0] not in project_roles(name)
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
        for role in (prov.user, prov.ro_user):
            a.execute(sql.SQL("ALTER ROLE {} PASSWORD 'x'").format(sql.Identifier(role)))
    assert not can_login(prov), "the sabotage did not take"
    assert not can_login(prov, ro=True), "the sabotage did not take"
    again = ensure_tenant_database_provisioned(row.id, "ap-southeast-1", platform=platform)
    assert again.password == prov.password
    assert again.ro_password == prov.ro_password
    assert can_login(prov)
    assert can_login(prov, ro=True)
    assert not can_login(prov, "x")
    assert not can_login(prov, "x", ro=True)
    assert_converged(fleet, "ap-southeast-1", again)


def test_role_with_wrong_attributes_converges(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, prov = create_project(
        platform, owner[0], name="attrs", region="eu-central-1", plan_type="pro"
    )
    with fleet.admin_conn("eu-central-1") as a:
        for role in (prov.user, prov.ro_user):
            a.execute(
                sql.SQL(
                    "ALTER ROLE {} NOLOGIN SUPERUSER CREATEDB CREATEROLE REPLICATION BYPASSRLS "
                    "CONNECTION LIMIT 1"
                ).format(sql.Identifier(role))
            )
    again = ensure_tenant_database_provisioned(row.id, "eu-central-1", platform=platform)
    assert_converged(fleet, "eu-central-1", again)
    with fleet.admin_conn("eu-central-1") as a:
        for role in (prov.user, prov.ro_user):
            limit = a.execute(
                "SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (role,)
            ).fetchone()
            assert limit == (60,), role


def test_lost_read_only_role_converges(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, prov = create_project(
        platform, owner[0], name="ro lost", region="us-east-1", plan_type="free"
    )
    with connect_as(prov) as c:
        c.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
    ro = sql.Identifier(prov.ro_user)
    # What was granted to the role goes first (by rw inside the database, by the
    # admin on the database itself), so the role itself can then go.
    with connect_as(prov) as in_db:
        in_db.execute(
            sql.SQL(
                "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {0}; "
                "REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {0}; "
                "REVOKE ALL ON SCHEMA public FROM {0}; "
                "ALTER DEFAULT PRIVILEGES REVOKE ALL ON TABLES FROM {0}; "
                "ALTER DEFAULT PRIVILEGES REVOKE ALL ON SEQUENCES FROM {0}; "
                "ALTER DEFAULT PRIVILEGES REVOKE ALL ON SCHEMAS FROM {0}"
            ).format(ro)
        )
    with fleet.admin_conn("us-east-1") as a:
        a.execute(
            sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(sql.Identifier(prov.database), ro)
        )
        a.execute(sql.SQL("DROP ROLE {}").format(ro))
    assert prov.ro_user not in fleet.roles("us-east-1")
    again = ensure_tenant_database_provisioned(row.id, "us-east-1", platform=platform)
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
    again = ensure_tenant_database_provisioned(row.id, "eu-central-1", platform=platform)
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
    again = ensure_tenant_database_provisioned(row.id, "us-east-1", platform=platform)
    assert_converged(fleet, "us-east-1", again)
    with connect_as(again) as c:
        assert c.execute("SELECT to_regclass('leftover')").fetchone() == (None,)


# ---- the gate role: partial states ------------------------------------------------


def test_missing_gate_role_converges(platform: Platform, fleet: FleetUnderTest) -> None:
    """Only the rw role exists (nothing else): pg_hba cannot admit it anywhere until
    the gate role exists again."""
    tid = insert_tenant(platform, "us-east-1")
    name = tenant_db_name(tid)
    gate, rw, _ = project_roles(name)
    with fleet.admin_conn("us-east-1") as a:
        a.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'leftover'").format(sql.Identifier(rw)))
    assert gate not in fleet.roles("us-east-1")
    prov = ensure_tenant_database_provisioned(tid, "us-east-1", platform=platform)
    assert_converged(fleet, "us-east-1", prov)
    assert not can_login(prov, "leftover")


def test_dropped_gate_role_shuts_logins_out_until_converged(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, prov = create_project(
        platform, owner[0], name="no gate", region="eu-central-1", plan_type="free"
    )
    with connect_as(prov) as c:
        c.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (3)")
    gate = prov.database
    with fleet.admin_conn("eu-central-1") as a:
        # It owns nothing and holds nothing, so nothing stops the DROP.
        a.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(gate)))
    assert gate not in fleet.roles("eu-central-1")
    # Without the gate, the right passwords no longer get past pg_hba.
    assert HBA_REJECTS in login_error(prov)
    assert HBA_REJECTS in login_error(prov, user=prov.ro_user, password=prov.ro_password)
    again = ensure_tenant_database_provisioned(row.id, "eu-central-1", platform=platform)
    assert (again.password, again.ro_password) == (prov.password, prov.ro_password)
    assert_converged(fleet, "eu-central-1", again)
    with connect_as(again, ro=True) as c:
        assert c.execute("SELECT x FROM kept").fetchall() == [(3,)]


def test_gate_role_given_login_and_password_converges(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, prov = create_project(
        platform, owner[0], name="gate login", region="ap-southeast-1", plan_type="free"
    )
    gate = prov.database
    with fleet.admin_conn("ap-southeast-1") as a:
        a.execute(
            sql.SQL(
                "ALTER ROLE {} LOGIN CREATEDB CREATEROLE PASSWORD 'gate-pw' CONNECTION LIMIT 5"
            ).format(sql.Identifier(gate))
        )
    # The sabotage took: the password is accepted (only the missing CONNECT
    # privilege stops the login now).
    before = login_error(prov, user=gate, password="gate-pw")
    assert "permission denied for database" in before, before
    again = ensure_tenant_database_provisioned(row.id, "ap-southeast-1", platform=platform)
    assert_converged(fleet, "ap-southeast-1", again)  # NOLOGIN, no password, no attributes
    after = login_error(prov, user=gate, password="gate-pw")
    assert "password authentication failed" in after, after


def ro_can_write(prov: ProvisionedDatabase, statement: str) -> bool:
    """Whether the ro role, after switching its transaction to read-write, may run
    `statement` (rolled back either way). Only a permission error means no."""
    with connect_as(prov, ro=True) as c:
        c.execute("BEGIN READ WRITE")
        try:
            c.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            return False
        finally:
            c.execute("ROLLBACK")
    return True


def test_table_owned_by_gate_role_is_reassigned_to_rw(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    """Both login roles inherit what the gate owns, so ro could write it; converging
    gives it to rw, and ro then reads it and cannot write it."""
    row, prov = create_project(
        platform, owner[0], name="gate owns", region="us-east-1", plan_type="free"
    )
    with connect_as(prov) as c:
        c.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    with in_tenant_db(prov) as t:  # rw is a member of the gate: it may give it its table
        gate = sql.Identifier(prov.database)
        t.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(gate))
        t.execute(sql.SQL("ALTER TABLE t OWNER TO {}").format(gate))
    # The hole: ro, a member of the gate, writes what the gate owns.
    assert ro_can_write(prov, "INSERT INTO t VALUES (99)"), "the sabotage did not take"

    again = ensure_tenant_database_provisioned(row.id, "us-east-1", platform=platform)
    with in_tenant_db(again) as t:
        owner_of = t.execute(
            "SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE oid = 'public.t'::regclass"
        ).fetchone()
    assert owner_of == (prov.user,)
    assert_converged(fleet, "us-east-1", again)
    assert not ro_can_write(again, "INSERT INTO t VALUES (100)")
    assert not ro_can_write(again, "UPDATE t SET x = 2")
    with connect_as(again, ro=True) as c:
        assert c.execute("SELECT x FROM t").fetchall() == [(1,)]
    with connect_as(again) as c:
        c.execute("INSERT INTO t VALUES (4)")
        assert c.execute("SELECT count(*) FROM t").fetchone() == (2,)


def test_schema_owned_by_gate_role_is_reassigned_and_readable_by_ro(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    """A schema and a table made as the gate itself, with no grants to anyone: one
    ensure gives both to rw, and ro reads them (as it reads all rw owns) and cannot
    write them."""
    row, prov = create_project(
        platform, owner[0], name="gate schema", region="us-east-1", plan_type="free"
    )
    gate = sql.Identifier(prov.database)
    with in_tenant_db(prov) as t:
        t.execute(sql.SQL("CREATE SCHEMA gated AUTHORIZATION {}").format(gate))
        t.execute(sql.SQL("SET ROLE {}").format(gate))
        t.execute("CREATE TABLE gated.g (x int); INSERT INTO gated.g VALUES (2)")
    assert ro_can_write(prov, "INSERT INTO gated.g VALUES (99)"), "the sabotage did not take"

    again = ensure_tenant_database_provisioned(row.id, "us-east-1", platform=platform)
    with in_tenant_db(again) as t:
        owners = t.execute(
            "SELECT pg_get_userbyid(relowner)::text FROM pg_class "
            "WHERE oid = 'gated.g'::regclass "
            "UNION ALL SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace "
            "WHERE nspname = 'gated'"
        ).fetchall()
    assert owners == [(prov.user,)] * 2
    assert not ro_can_write(again, "INSERT INTO gated.g VALUES (100)")
    with connect_as(again) as c:
        c.execute("INSERT INTO gated.g VALUES (5)")
    with connect_as(again, ro=True) as c:
        assert c.execute("SELECT x FROM gated.g ORDER BY x").fetchall() == [(2,), (5,)]
    assert_converged(fleet, "us-east-1", again)


def test_privileges_granted_to_gate_role_are_revoked(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    """The gate is granted nothing: whatever it holds, ro inherits, write included."""
    row, prov = create_project(
        platform, owner[0], name="gate grants", region="ap-southeast-1", plan_type="free"
    )
    with connect_as(prov) as c:
        c.execute("CREATE TABLE t (x int)")
    with in_tenant_db(prov) as t:
        t.execute(
            sql.SQL("GRANT INSERT, UPDATE, DELETE ON t TO {}").format(sql.Identifier(prov.database))
        )
    assert ro_can_write(prov, "INSERT INTO t VALUES (99)"), "the sabotage did not take"
    again = ensure_tenant_database_provisioned(row.id, "ap-southeast-1", platform=platform)
    assert not ro_can_write(again, "INSERT INTO t VALUES (100)")
    assert_converged(fleet, "ap-southeast-1", again)


def test_project_from_the_two_role_scheme_converges(
    platform: Platform, fleet: FleetUnderTest
) -> None:
    """What the previous scheme left on a server: a login role named like the database
    owning it and everything in it, and a `_ro` role reading it through grants."""
    tid = insert_tenant(platform, "eu-central-1")
    name = tenant_db_name(tid)
    gate, _, ro = project_roles(name)
    old, old_ro = sql.Identifier(gate), sql.Identifier(ro)
    with fleet.admin_conn("eu-central-1") as a:
        a.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'old-pw'").format(old))
        a.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'old-ro-pw'").format(old_ro))
        a.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(old, old))
        a.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(old))
        a.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}, {}").format(old, old, old_ro))
    with psycopg.connect(
        **{
            **fleet.fleet.conninfo(fleet.server("eu-central-1"), name),
            "user": gate,
            "password": "old-pw",
        },
        autocommit=True,
    ) as t:  # the old scheme's login role, named like the database
        t.execute(sql.SQL("SET ROLE {}").format(old))
        t.execute(
            sql.SQL(
                "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {}; "
                "CREATE SCHEMA app; CREATE TABLE app.items (x int); INSERT INTO app.items "
                "VALUES (1); CREATE TABLE notes (y text); INSERT INTO notes VALUES ('n'); "
                "GRANT USAGE ON SCHEMA app TO {}"
            ).format(old_ro, old_ro)
        )
    prov = ensure_tenant_database_provisioned(tid, "eu-central-1", platform=platform)
    assert_converged(fleet, "eu-central-1", prov)
    assert "password authentication failed" in login_error(prov, user=gate, password="old-pw")
    with connect_as(prov, ro=True) as c:
        assert c.execute("SELECT x FROM app.items").fetchall() == [(1,)]
        assert c.execute("SELECT y FROM notes").fetchall() == [("n",)]
    with connect_as(prov) as c:
        c.execute("INSERT INTO app.items VALUES (2); UPDATE notes SET y = 'm'")


def test_desired_password_is_applied(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    row, prov = create_project(
        platform, owner[0], name="rotate", region="eu-central-1", plan_type="free"
    )
    wanted = "N3w-" + secrets.token_urlsafe(18) + "'\";$"
    again = ensure_tenant_database_provisioned(
        row.id, "eu-central-1", desired_password=wanted, platform=platform
    )
    assert again.password == wanted
    assert can_login(again)
    assert not can_login(prov), "the old password still works"
    assert tenant_client(platform).endpoint(row.id).password == wanted
    # A later call without a desired password keeps the stored one.
    later = ensure_tenant_database_provisioned(row.id, "eu-central-1", platform=platform)
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


def test_gate_role_owns_and_is_granted_nothing(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    """After the project has objects of every kind and ensure has run again over them."""
    row, prov = create_project(
        platform, owner[0], name="inert", region="eu-central-1", plan_type="pro"
    )
    with connect_as(prov) as c:
        c.execute(
            "CREATE SCHEMA app; CREATE TABLE app.items (id serial PRIMARY KEY, v text); "
            "CREATE TABLE plain (x int); CREATE VIEW v AS SELECT x FROM plain; "
            "CREATE TYPE mood AS ENUM ('ok'); CREATE SEQUENCE s; "
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'"
        )
    again = ensure_tenant_database_provisioned(row.id, "eu-central-1", platform=platform)
    assert_converged(fleet, "eu-central-1", again)
    gate = prov.database
    assert_gate_inert(fleet, "eu-central-1", again)
    with in_tenant_db(again) as t:
        rights = t.execute(
            "SELECT has_table_privilege(%(g)s, 'public.plain', 'SELECT'), "
            "has_table_privilege(%(g)s, 'app.items', 'INSERT'), "
            "has_schema_privilege(%(g)s, 'public', 'CREATE'), "
            "has_schema_privilege(%(g)s, 'app', 'USAGE'), "
            "has_database_privilege(%(g)s, current_database(), 'TEMPORARY')",
            {"g": gate},
        ).fetchone()
    assert rights == (False,) * 5


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
    assert f'CREATE ROLE "{prov.user}"' in written or f"CREATE ROLE {prov.user}" in written, (
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
