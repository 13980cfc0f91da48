"""Tenant isolation with real credentials on the real servers: a project's
login roles reach its own database and nothing else, and a deleted project
leaves nothing that still lets anyone in.

Each project has a NOLOGIN gate role `tenant_<u>` named like its database, and
two login roles `tenant_<u>_rw` (owns the database) and `tenant_<u>_ro`, both
members of the gate; pg_hba's `samerole` admits them to that database only."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from pgfleet.tenants.provisioning import ProvisionedDatabase
from pgfleet.tenants.service import create_project, delete_project
from pgfleet.tenants.spares import CLAIMED, refill_spares
from tests.helpers import ROUTER_REFUSALS, Api, FleetUnderTest, run_psql

# What a login refused for lack of access may say; anything else (server
# down, timeout, bad password) is not the isolation being tested.
ACCESS_REFUSALS = (
    "pg_hba.conf rejects connection",
    "no pg_hba.conf entry",
    "permission denied for database",
)
BAD_PASSWORD = "password authentication failed"
# The refusal that does not depend on any database's CONNECT privileges.
HBA_REJECTS = ("pg_hba.conf rejects connection",)
# A deleted project's roles are gone: pg_hba finds no membership, or (for a
# role that somehow survived) the password is refused.
GONE = (BAD_PASSWORD, *HBA_REJECTS, *ROUTER_REFUSALS)


def gate_of(prov: ProvisionedDatabase) -> str:
    """The project's NOLOGIN gate role, named like its database."""
    return prov.database


def set_role(conn: psycopg.Connection[Any], role: str) -> None:
    conn.execute(psycopg.sql.SQL("SET ROLE {}").format(psycopg.sql.Identifier(role)))


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
        f"?sslmode={prov.sslmode}&sslrootcert={prov.sslrootcert}&connect_timeout=5"
    )


def assert_refused(uri: str, reasons: tuple[str, ...]) -> None:
    res = run_psql(uri, "select current_user, current_database()")
    assert res.returncode != 0, f"login was accepted: {res.stdout!r}"
    assert any(r in res.stderr for r in reasons), f"refused for another reason: {res.stderr}"


def assert_accepted(uri: str, user: str, dbname: str) -> None:
    res = run_psql(uri, "select current_user || ' ' || current_database()")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{user} {dbname}"


# Platforms whose projects are made from prepared spares (the others: the slow way).
PREPARED: set[int] = set()


@pytest.fixture(params=["prepared", "slow"])
def platform(request: pytest.FixtureRequest, platform_factory: Any) -> Platform:
    """Every test here runs twice: on projects claimed from prepared spares,
    and on projects made the slow way. No refill runs in the background
    (spare_databases=0): the prepared ones are made before each create."""
    p: Platform = platform_factory(spare_databases=0)
    if request.param == "prepared":
        PREPARED.add(id(p))
    return p


def two_projects(
    platform: Platform, owner: Owner, region: str = "us-east-1"
) -> tuple[tuple[dict[str, Any], ProvisionedDatabase], tuple[dict[str, Any], ProvisionedDatabase]]:
    prepared = id(platform) in PREPARED
    if prepared:
        server = next(s for s in platform.servers.all(enabled_only=True) if s.region == region)
        refill_spares(platform, server, 2)
    a = create_project(platform, owner, name="project a", region=region, plan_type="free")
    b = create_project(platform, owner, name="project b", region=region, plan_type="free")
    assert a[1].port == b[1].port, "both projects should share one server"
    for _, prov in (a, b):
        assert (CLAIMED in prov.actions) == prepared, prov.actions
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
        assert_refused(uri_for(a, dbname=b.database, ro=ro), HBA_REJECTS)
        assert_refused(uri_for(b, dbname=a.database, ro=ro), HBA_REJECTS)
    # Defence in depth: even without pg_hba, the privilege is not there.
    with fleet.admin_conn("us-east-1") as adm:
        for x, y in ((a, b), (b, a)):
            for role in (x.user, x.ro_user, gate_of(x)):
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
        # Privileges alone would let the project in: only pg_hba stands in the way.
        with fleet.admin_conn("us-east-1") as adm:
            role = a.ro_user if ro else a.user
            assert adm.execute(
                "SELECT has_database_privilege(%s, %s, 'CONNECT')", (role, other)
            ).fetchone() == (True,)
        assert_refused(uri_for(a, dbname=other, ro=ro), HBA_REJECTS)
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
    assert_refused(uri_for(a, dbname=dbname, ro=ro), HBA_REJECTS)


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


def test_set_role_stays_inside_the_project(platform: Platform, owner: tuple[Owner, str]) -> None:
    """Neither login role can become another project's roles, nor ro the rw role, nor
    change who belongs to which gate; and becoming the gate role gives nothing."""
    (_, a), (_, b) = two_projects(platform, owner[0])
    sql = psycopg.sql
    with psycopg.connect(uri_for(a), autocommit=True) as c:
        c.execute("CREATE TABLE data (x int); INSERT INTO data VALUES (1)")

    cases = {
        a.user: [gate_of(b), b.user, b.ro_user],
        a.ro_user: [a.user, gate_of(b), b.user, b.ro_user],
    }
    for ro, forbidden in zip((False, True), cases.values(), strict=True):
        me = a.ro_user if ro else a.user
        with psycopg.connect(uri_for(a, ro=ro), autocommit=True) as c:
            for role in forbidden:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    set_role(c, role)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(sql.SQL("SET SESSION AUTHORIZATION {}").format(sql.Identifier(b.user)))
            # Memberships decide what pg_hba admits: none can be added from here
            # (in a read-write transaction, so only privileges can refuse).
            c.execute("SET default_transaction_read_only = off")
            grants = [
                (gate_of(b), me),  # join another project's gate
                (gate_of(a), b.user),  # let another project into this one
                (gate_of(a), b.ro_user),
            ]
            if ro:
                grants.append((a.user, me))  # ro becoming a member of rw
            for granted, to in grants:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    c.execute(
                        sql.SQL("GRANT {} TO {}").format(
                            sql.Identifier(granted), sql.Identifier(to)
                        )
                    )
            assert c.execute("SELECT current_user::text").fetchone() == (me,)

            # Becoming the gate is allowed (it is what pg_hba checks) and gives nothing.
            c.execute("BEGIN READ WRITE")
            set_role(c, gate_of(a))
            assert c.execute("SELECT current_user::text").fetchone() == (gate_of(a),)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("INSERT INTO data VALUES (2)")
            c.execute("ROLLBACK")
            c.execute("BEGIN READ WRITE")
            set_role(c, gate_of(a))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT x FROM data")
            c.execute("ROLLBACK")
            c.execute("BEGIN READ WRITE")
            set_role(c, gate_of(a))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("CREATE TABLE gate_made (x int)")
            c.execute("ROLLBACK")
    with psycopg.connect(uri_for(a), autocommit=True) as c:
        # The same INSERT works for rw itself: what failed above was the gate.
        c.execute("INSERT INTO data VALUES (3)")
        assert c.execute("SELECT x FROM data ORDER BY x").fetchall() == [(1,), (3,)]


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
        out = delete_project(platform, owner[0], str(row_a.id))
        assert out.status == "deleted"
        assert a.database not in fleet.databases("eu-central-1")
        assert {a.user, a.ro_user, gate_of(a)} & fleet.roles("eu-central-1") == set()
        with pytest.raises(psycopg.OperationalError):
            session.execute("select 1")
    finally:
        session.close()
    assert_refused(uri_for(a), GONE)
    assert_refused(uri_for(a, ro=True), GONE)
    status, deleted_at, info = tenant_row(platform, row_a.id)
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
    assert r.json()["project"]["status"] == "deleted"
    assert conn["user"] == conn["database"] + "_rw"
    assert conn["database"] not in fleet.databases("ap-southeast-1")
    left = fleet.roles("ap-southeast-1") & {
        conn["database"],
        conn["database"] + "_rw",
        conn["database"] + "_ro",
    }
    assert left == set(), f"roles left behind: {left}"
    assert_refused(conn["uri"], GONE)
    status, deleted_at, info = tenant_row(platform, uuid.UUID(body["id"]))
    assert (status, info) == ("deleted", None)
    assert deleted_at is not None
    assert api.get(f"/v1/projects/{body['id']}").status_code == 404
