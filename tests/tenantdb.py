"""Helpers that look at what provisioning left on a regional server: the
project's roles and objects, logins as its credentials, and the assertions
that the database converged and its gate role is inert."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from pgfleet.platform.core import Platform
from pgfleet.tenants.provisioning import ProvisionedDatabase
from tests.helpers import FleetUnderTest


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
