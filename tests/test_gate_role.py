"""The gate role (the database owner nobody logs in as): every partial state it
can be left in converges, and it owns and is granted nothing."""

from __future__ import annotations

import secrets

import psycopg
from psycopg import sql

from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from pgfleet.tenants.naming import tenant_db_name
from pgfleet.tenants.provisioning import (
    ProvisionedDatabase,
    ensure_tenant_database_provisioned,
)
from pgfleet.tenants.service import create_project
from tests.helpers import FleetUnderTest, tenant_client
from tests.tenantdb import (
    assert_converged,
    assert_gate_inert,
    can_login,
    connect_as,
    in_tenant_db,
    insert_tenant,
    login_error,
    project_roles,
)

HBA_REJECTS = "pg_hba.conf rejects connection"


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
