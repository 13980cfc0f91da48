"""Tenant isolation with real credentials on the real servers: a project's
role reaches its own database and nothing else, and a deleted project leaves
nothing that still lets anyone in."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from pgfleet.platform.core import Platform
from pgfleet.tenants.provisioning import ProvisionedDatabase
from pgfleet.tenants.service import Owner, create_project, delete_project
from tests.conftest import Api, FleetUnderTest, run_psql

# What a login refused for lack of access may say; anything else (server
# down, timeout, bad password) is not the isolation being tested.
ACCESS_REFUSALS = (
    "pg_hba.conf rejects connection",
    "no pg_hba.conf entry",
    "permission denied for database",
)
BAD_PASSWORD = "password authentication failed"


def uri_for(
    prov: ProvisionedDatabase,
    *,
    dbname: str | None = None,
    password: str | None = None,
    ro: bool = False,
) -> str:
    """A URI with the project's rw (or, with ro, read-only) credentials."""
    user = prov.ro_user if ro else prov.user
    if password is None:
        password = prov.ro_password if ro else prov.password
    return (
        f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
        f"@{prov.host}:{prov.port}/{quote(dbname or prov.database, safe='')}"
        f"?sslmode={prov.sslmode}&connect_timeout=5"
    )


def assert_refused(uri: str, reasons: tuple[str, ...]) -> None:
    res = run_psql(uri, "select current_user, current_database()")
    assert res.returncode != 0, f"login was accepted: {res.stdout!r}"
    assert any(r in res.stderr for r in reasons), f"refused for another reason: {res.stderr}"


def assert_accepted(uri: str, user: str, dbname: str) -> None:
    res = run_psql(uri, "select current_user || ' ' || current_database()")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{user} {dbname}"


def two_projects(
    platform: Platform, owner: Owner, region: str = "us-east-1"
) -> tuple[tuple[dict[str, Any], ProvisionedDatabase], tuple[dict[str, Any], ProvisionedDatabase]]:
    a = create_project(platform, owner, name="project a", region=region, plan_type="free")
    b = create_project(platform, owner, name="project b", region=region, plan_type="free")
    assert a[1].port == b[1].port, "both projects should share one server"
    return a, b


def tenant_row(platform: Platform, tid: uuid.UUID) -> tuple[Any, ...]:
    with platform.db.connection() as conn:
        row = conn.execute(
            "SELECT status, deleted_at, connection_info FROM tenants WHERE id = %s", (tid,)
        ).fetchone()
    assert row is not None, "the tenant row must be kept"
    return tuple(row)


def test_own_credentials_work(platform: Platform, owner: tuple[Owner, str]) -> None:
    (_, a), (_, b) = two_projects(platform, owner[0])
    assert_accepted(uri_for(a), a.user, a.database)
    assert_accepted(uri_for(b), b.user, b.database)
    assert_accepted(uri_for(a, ro=True), a.ro_user, a.database)
    assert_accepted(uri_for(b, ro=True), b.ro_user, b.database)


def test_cannot_reach_another_projects_database(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    (_, a), (_, b) = two_projects(platform, owner[0])
    for ro in (False, True):
        assert_refused(uri_for(a, dbname=b.database, ro=ro), ACCESS_REFUSALS)
        assert_refused(uri_for(b, dbname=a.database, ro=ro), ACCESS_REFUSALS)
    # Defence in depth: even without pg_hba, the privilege is not there.
    with fleet.admin_conn("us-east-1") as adm:
        for x, y in ((a, b), (b, a)):
            for role in (x.user, x.ro_user):
                row = adm.execute(
                    "SELECT has_database_privilege(%s, %s, 'CONNECT')", (role, y.database)
                ).fetchone()
                assert row == (False,), f"{role} may connect to {y.database}"


@pytest.mark.parametrize("ro", [False, True], ids=["rw", "ro"])
def test_cannot_reach_other_databases_on_the_server(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest, ro: bool
) -> None:
    """A database on a regional server that is not a project's (an operator's,
    or a future pgfleet one) keeps PostgreSQL's default CONNECT for PUBLIC;
    pg_hba must still keep every project's roles out of it."""
    _, a = create_project(platform, owner[0], name="other", region="us-east-1", plan_type="free")
    other = f"scratch_{uuid.uuid4().hex[:12]}"
    with fleet.admin_conn("us-east-1") as adm:
        adm.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(other)))
    try:
        assert_refused(uri_for(a, dbname=other, ro=ro), ACCESS_REFUSALS)
    finally:
        with fleet.admin_conn("us-east-1") as adm:
            adm.execute(
                psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    psycopg.sql.Identifier(other)
                )
            )


@pytest.mark.parametrize("ro", [False, True], ids=["rw", "ro"])
@pytest.mark.parametrize("dbname", ["postgres", "template1"])
def test_cannot_reach_system_databases(
    platform: Platform, owner: tuple[Owner, str], dbname: str, ro: bool
) -> None:
    _, a = create_project(platform, owner[0], name="sys", region="eu-central-1", plan_type="pro")
    assert_refused(uri_for(a, dbname=dbname, ro=ro), ACCESS_REFUSALS)


def test_wrong_password_fails(platform: Platform, owner: tuple[Owner, str]) -> None:
    _, a = create_project(platform, owner[0], name="pw", region="ap-southeast-1", plan_type="free")
    assert_refused(uri_for(a, password=a.password + "x"), (BAD_PASSWORD,))
    assert_refused(uri_for(a, password=a.password.upper() + "!"), (BAD_PASSWORD,))
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(uri_for(a, password="")).close()
    # Each role has its own password: neither opens the other.
    assert a.ro_password != a.password
    assert_refused(uri_for(a, ro=True, password=a.password), (BAD_PASSWORD,))
    assert_refused(uri_for(a, password=a.ro_password), (BAD_PASSWORD,))


def test_cannot_become_another_role(platform: Platform, owner: tuple[Owner, str]) -> None:
    (_, a), (_, b) = two_projects(platform, owner[0])
    with psycopg.connect(uri_for(a), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(psycopg.sql.SQL("SET ROLE {}").format(psycopg.sql.Identifier(b.user)))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(
                psycopg.sql.SQL("CREATE DATABASE {}").format(
                    psycopg.sql.Identifier(a.database + "_more")
                )
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("CREATE ROLE sneaky LOGIN")
    # The read-only role cannot become the project's own role, nor write by
    # switching its transactions back to read-write.
    with psycopg.connect(uri_for(a), autocommit=True) as c:
        c.execute("CREATE TABLE data (x int)")
    with psycopg.connect(uri_for(a, ro=True), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(psycopg.sql.SQL("SET ROLE {}").format(psycopg.sql.Identifier(a.user)))
        # Read-only transactions are one guard; the role's missing privileges
        # are the one that holds when the tenant switches the first off.
        c.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
        c.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("INSERT INTO data VALUES (1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("CREATE TABLE mine (x int)")
    with psycopg.connect(uri_for(a), autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM data").fetchone() == (0,)


def test_no_replication_connection(platform: Platform, owner: tuple[Owner, str]) -> None:
    _, a = create_project(platform, owner[0], name="repl", region="us-east-1", plan_type="free")
    # Logical (walsender on a database): refused because the role lacks REPLICATION.
    with pytest.raises(psycopg.OperationalError, match="replication role"):
        psycopg.connect(uri_for(a) + "&replication=database").close()
    # Physical: pg_hba has no replication entry for tenant roles.
    with pytest.raises(psycopg.OperationalError, match=r"pg_hba\.conf"):
        psycopg.connect(uri_for(a) + "&replication=true").close()


def test_delete_removes_database_role_and_access(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    (row_a, a), (_, b) = two_projects(platform, owner[0], region="eu-central-1")
    # An open session of the project does not stop the delete; it is ended.
    session = psycopg.connect(uri_for(a), autocommit=True)
    try:
        out = delete_project(platform, owner[0], str(row_a["id"]))
        assert out["status"] == "deleted"
        assert a.database not in fleet.databases("eu-central-1")
        assert a.user not in fleet.roles("eu-central-1")
        assert a.ro_user not in fleet.roles("eu-central-1")
        with pytest.raises(psycopg.OperationalError):
            session.execute("select 1")
    finally:
        session.close()
    assert_refused(uri_for(a), (BAD_PASSWORD,))
    assert_refused(uri_for(a, ro=True), (BAD_PASSWORD, *ACCESS_REFUSALS))
    status, deleted_at, info = tenant_row(platform, row_a["id"])
    assert status == "deleted"
    assert deleted_at is not None
    assert info is None
    # The neighbour is untouched.
    assert b.database in fleet.databases("eu-central-1")
    assert_accepted(uri_for(b), b.user, b.database)


def test_api_delete_removes_database_role_and_access(
    api: Api, platform: Platform, fleet: FleetUnderTest
) -> None:
    r = api.post(
        "/v1/projects", json={"name": "doomed", "region": "ap-southeast-1", "plan_type": "free"}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    conn = body["connection"]
    assert_accepted(conn["uri"], conn["user"], conn["database"])
    r = api.delete(f"/v1/projects/{body['id']}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "deleted"
    assert conn["database"] not in fleet.databases("ap-southeast-1")
    assert conn["user"] not in fleet.roles("ap-southeast-1")
    assert_refused(conn["uri"], (BAD_PASSWORD,))
    status, deleted_at, info = tenant_row(platform, uuid.UUID(body["id"]))
    assert (status, info) == ("deleted", None)
    assert deleted_at is not None
    assert api.get(f"/v1/projects/{body['id']}").status_code == 404
