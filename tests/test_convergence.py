"""ensure_tenant_database_provisioned converges from every partial state a crash,
an operator or a tenant can leave behind, on the real fleet."""

from __future__ import annotations

import secrets
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from pgfleet.tenants.naming import tenant_db_name
from pgfleet.tenants.provisioning import (
    ensure_tenant_database_provisioned,
)
from pgfleet.tenants.service import create_project
from tests.helpers import FleetUnderTest
from tests.tenantdb import (
    assert_converged,
    can_login,
    connect_as,
    insert_tenant,
    login_error,
    object_oids,
    project_roles,
)


def object_oids_of_role(fleet: FleetUnderTest, region: str, role: str) -> Any:
    with fleet.admin_conn(region) as a:
        return a.execute("SELECT oid FROM pg_roles WHERE rolname = %s", (role,)).fetchone()


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
