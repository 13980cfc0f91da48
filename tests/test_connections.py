"""DatabasePlatformClient.get_tenant_connection against the real servers:
routing, the project's own role, read-only mode, errors, bounded pools and
password changes."""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any

import psycopg
import pytest

from pgfleet.auth import create_owner
from pgfleet.errors import InvalidInput, ProjectNotFound
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from pgfleet.tenants.provisioning import ProvisionedDatabase, ensure_tenant_database_provisioned
from pgfleet.tenants.service import create_project, delete_project
from tests.helpers import FleetUnderTest, tenant_client


def make_project(
    platform: Platform, owner: Owner, region: str, name: str = "app", plan: str = "free"
) -> tuple[uuid.UUID, ProvisionedDatabase]:
    row, prov = create_project(platform, owner, name=name, region=region, plan_type=plan)
    return row.id, prov


def whoami(conn: psycopg.Connection[Any]) -> tuple[str, str, int]:
    row = conn.execute(
        "SELECT current_user::text, current_database()::text, inet_server_port()"
    ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def tenant_backends(fleet: FleetUnderTest, region: str, roles: list[str]) -> int:
    with fleet.admin_conn(region) as a:
        row = a.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE usename LIKE 'tenant\\_%%' AND usename = ANY(%s)",
            (roles,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_rw_connection_is_the_projects_role_on_its_server(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    tid, prov = make_project(platform, owner[0], "eu-central-1")
    with tenant_client(platform).get_tenant_connection(tid, "rw") as conn:
        user, db, port = whoami(conn)
        assert (user, db) == (prov.user, prov.database)
        assert port == fleet.server("eu-central-1").port
        assert conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone() == (False,)
        assert conn.execute("SELECT session_user::text").fetchone() == (prov.user,)
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, label text)")
        conn.execute("INSERT INTO items VALUES (1, 'one'), (2, 'two')")
    # Committed: visible to a fresh, independent connection.
    with psycopg.connect(
        host=prov.host,
        port=prov.port,
        dbname=prov.database,
        user=prov.user,
        password=prov.password,
        sslmode=prov.sslmode,
        sslrootcert=prov.sslrootcert,
    ) as direct:
        assert direct.execute("SELECT count(*) FROM items").fetchone() == (2,)
        owner_row = direct.execute(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'items'"
        ).fetchone()
        assert owner_row == (prov.user,)


def test_ro_connection_reads_but_cannot_write(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    tid, prov = make_project(platform, owner[0], "ap-southeast-1")
    # Tables (and schemas) the project creates later are readable too.
    with tenant_client(platform).get_tenant_connection(tid, "rw") as conn:
        conn.execute("CREATE TABLE notes (id serial, body text)")
        conn.execute("INSERT INTO notes (body) VALUES ('hello')")
        conn.execute(
            "CREATE SCHEMA app; CREATE TABLE app.cfg (k text); INSERT INTO app.cfg VALUES ('a')"
        )
    with tenant_client(platform).get_tenant_connection(tid, "ro") as conn:
        user, db, port = whoami(conn)
        assert (user, db) == (prov.ro_user, prov.database)
        assert port == fleet.server("ap-southeast-1").port
        assert conn.execute("SELECT body FROM notes").fetchall() == [("hello",)]
        assert conn.execute("SELECT k FROM app.cfg").fetchall() == [("a",)]
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO notes (body) VALUES ('nope')")
    # A new transaction on a ro connection is read-only as well.
    with (
        tenant_client(platform).get_tenant_connection(tid, "ro") as conn,
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
    ):
        conn.execute("CREATE TABLE more (x int)")
    # Switching the transaction back to read-write does not give it writes.
    with tenant_client(platform).get_tenant_connection(tid, "ro") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET TRANSACTION READ WRITE; INSERT INTO notes (body) VALUES ('sneak')")
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET TRANSACTION READ WRITE; SELECT nextval('notes_id_seq')")
    with tenant_client(platform).get_tenant_connection(tid, "rw") as conn:
        assert conn.execute("SELECT count(*) FROM notes").fetchone() == (1,)


def test_unknown_mode_is_invalid_input(platform: Platform, owner: tuple[Owner, str]) -> None:
    tid, _ = make_project(platform, owner[0], "us-east-1")
    for mode in ("rx", "RW", "", "write"):
        with (
            pytest.raises(InvalidInput),
            tenant_client(platform).get_tenant_connection(tid, mode),
        ):
            pytest.fail("a connection was handed out for an unknown mode")


def test_unknown_project_is_not_found(platform: Platform) -> None:
    for tid in (str(uuid.uuid4()), "not-a-uuid", ""):
        with (
            pytest.raises(ProjectNotFound),
            tenant_client(platform).get_tenant_connection(tid),
        ):
            pytest.fail("a connection was handed out for an unknown project")


def test_deleted_project_is_not_found(platform: Platform, owner: tuple[Owner, str]) -> None:
    tid, _ = make_project(platform, owner[0], "eu-central-1")
    with tenant_client(platform).get_tenant_connection(tid) as conn:
        conn.execute("SELECT 1")
    assert tenant_client(platform).pool_count() == 1
    delete_project(platform, owner[0], str(tid))
    assert tenant_client(platform).pool_count() == 0, "the deleted project's pool was kept"
    for mode in ("rw", "ro"):
        with (
            pytest.raises(ProjectNotFound),
            tenant_client(platform).get_tenant_connection(tid, mode),
        ):
            pytest.fail("a connection was handed out for a deleted project")


def test_pools_are_bounded(platform_factory: Any, fleet: FleetUnderTest) -> None:
    cap, size = 3, 1
    platform: Platform = platform_factory(tenant_pool_cap=cap, tenant_pool_size=size)
    who, _ = create_owner(platform, "many")
    projects = [make_project(platform, who, "us-east-1", name=f"p{i}") for i in range(8)]
    roles = [prov.user for _, prov in projects]
    for _ in range(2):
        for tid, prov in projects:
            with tenant_client(platform).get_tenant_connection(tid) as conn:
                assert whoami(conn)[0] == prov.user
            assert tenant_client(platform).pool_count() <= cap
    assert tenant_client(platform).pool_count() <= cap
    # Closed pools' backends go away; give the server a moment to reap them.
    deadline = time.monotonic() + 5
    while (n := tenant_backends(fleet, "us-east-1", roles)) > cap * size:
        assert time.monotonic() < deadline, f"{n} tenant backends open, more than {cap * size}"
        time.sleep(0.05)
    assert n >= 1, "the most recent pools should keep their idle connections"


def test_password_change_replaces_stale_pool(
    platform: Platform, owner: tuple[Owner, str], fleet: FleetUnderTest
) -> None:
    tid, prov = make_project(platform, owner[0], "eu-central-1")
    with tenant_client(platform).get_tenant_connection(tid) as conn:
        old_pid = conn.execute("SELECT pg_backend_pid()").fetchone()
    with tenant_client(platform).get_tenant_connection(tid, "ro") as conn:
        conn.execute("SELECT 1")
    new_password = "rotated-" + secrets.token_urlsafe(16)
    ensure_tenant_database_provisioned(
        tid, "eu-central-1", desired_password=new_password, platform=platform
    )
    # Sessions opened with the old password would survive the change; end them
    # so a stale pool could only hand out dead connections or log in anew
    # with the old password.
    with fleet.admin_conn("eu-central-1") as a:
        a.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
            (prov.user,),
        )
    for mode, user in (("rw", prov.user), ("ro", prov.ro_user)):
        with tenant_client(platform).get_tenant_connection(tid, mode) as conn:
            assert whoami(conn)[0] == user
            assert conn.execute("SELECT pg_backend_pid()").fetchone() != old_pid
    assert tenant_client(platform).endpoint(tid).password == new_password
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host=prov.host,
            port=prov.port,
            dbname=prov.database,
            user=prov.user,
            password=prov.password,
            sslmode=prov.sslmode,
            sslrootcert=prov.sslrootcert,
        ).close()


def test_pools_recover_at_once_when_every_backend_was_ended(
    platform: Platform, fleet: FleetUnderTest
) -> None:
    """Someone ends every platform backend (an operator, a failover): the
    next caller gets a working connection within one check backoff, not a
    pool timeout while the pool finds its dead connections one by one."""
    from contextlib import ExitStack

    with ExitStack() as stack:  # grow the pool to several idle connections
        for _ in range(6):
            stack.enter_context(platform.db.connection())
    assert platform.db.pool.get_stats()["pool_size"] >= 6
    with fleet.admin_conn(None) as c:
        ended = c.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = 'pgfleet' AND pid <> pg_backend_pid()",
            (platform.conninfo["dbname"],),
        ).fetchone()
    assert ended is not None and ended[0] >= 6
    time.sleep(0.2)  # the FATALs reach the idle sockets
    # psycopg_pool alone waits 1 s, then 2 s, ... between failed checks: it
    # would give up here after the 1 s and 2 s waits.
    with platform.db.connection(timeout=2.5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not platform.breaker.down
