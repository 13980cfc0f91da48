"""What a tenant may do to its own project's objects, and pgfleet still does
its work: locks held on its own role or database, a database made a template
or given a connection limit, sessions kept open across a password rotation,
large objects written with the read-only role. Real servers throughout."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.helpers import Api, FleetUnderTest, connect, create_ok, finished, repaired

REGION = "us-east-1"


def holding(connection: dict[str, Any], statement: str) -> psycopg.Connection[Any]:
    """A session of the project's rw role, inside a transaction that ran
    `statement` and stays open (holding what it locked)."""
    conn = psycopg.connect(connection["uri"], connect_timeout=5)
    conn.execute(statement)
    return conn


def ended(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return True
    finally:
        conn.close()
    return False


def role_setting(fleet: FleetUnderTest, role: str, setting: str) -> str | None:
    with fleet.admin_conn(REGION) as c:
        row = c.execute(
            "SELECT s FROM pg_db_role_setting d, unnest(d.setconfig) s "
            "WHERE d.setrole = %s::regrole AND d.setdatabase = 0 AND s LIKE %s",
            (role, setting + "=%"),
        ).fetchone()
    return str(row[0]) if row else None


def test_a_lock_on_its_own_role_delays_a_plan_change_by_a_second(
    api: Api, fleet: FleetUnderTest
) -> None:
    body = create_ok(api, "locked", region=REGION)
    user = body["connection"]["user"]
    # A per-role setting changed in an open transaction: its row stays locked.
    holder = holding(body["connection"], "ALTER ROLE CURRENT_USER SET work_mem = '5MB'")
    t0 = time.monotonic()
    op = finished(api, api.post(f"/v1/projects/{body['id']}/plan", json={"plan": "pro"}))
    took = time.monotonic() - t0
    assert took < 6, f"the plan change waited {took:.1f}s behind the tenant's lock"
    assert ended(holder), "the session that blocked the plan change is still there"
    assert op["status"] == "finished"
    assert role_setting(fleet, user, "statement_timeout") == "statement_timeout=60000ms"
    assert role_setting(fleet, user, "work_mem") is None  # its transaction was rolled back


def test_a_lock_on_its_own_role_cannot_keep_a_paused_project_reachable(
    api: Api, fleet: FleetUnderTest
) -> None:
    body = create_ok(api, "pausing", region=REGION)
    pid = body["id"]
    # A password change in an open transaction locks the role's row: pause's
    # NOLOGIN must not wait for it, nor may the password survive.
    holder = holding(body["connection"], "ALTER ROLE CURRENT_USER PASSWORD 'chosen-by-tenant'")
    t0 = time.monotonic()
    finished(api, api.post(f"/v1/projects/{pid}/pause"))
    assert time.monotonic() - t0 < 6
    assert ended(holder)
    assert api.get(f"/v1/projects/{pid}").json()["status"] == "paused"
    with pytest.raises(psycopg.OperationalError):
        connect(body["connection"])
    finished(api, api.post(f"/v1/projects/{pid}/resume"))
    with connect(body["connection"]) as c:  # the password pgfleet gave it, not the tenant's
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_a_database_made_a_template_is_still_deleted(api: Api, fleet: FleetUnderTest) -> None:
    body = create_ok(api, "template", region=REGION)
    db = body["connection"]["database"]
    with connect(body["connection"]) as c:
        c.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE true").format(sql.Identifier(db)))
    with fleet.admin_conn(REGION) as c:
        assert c.execute(
            "SELECT datistemplate FROM pg_database WHERE datname = %s", (db,)
        ).fetchone() == (True,)
    op = finished(api, api.delete(f"/v1/projects/{body['id']}"))
    assert op["status"] == "finished"
    assert db not in fleet.databases(REGION)
    assert not {r for r in fleet.roles(REGION) if r.startswith(db)}


def test_database_attributes_are_reported_and_repaired(
    api: Api, admin_api: Api, fleet: FleetUnderTest
) -> None:
    body = create_ok(api, "limited", region=REGION)
    # The server's own limits: direct (a router may reuse a pooled backend).
    body["connection"] = api.get(
        f"/v1/projects/{body['id']}/connection", params={"direct": "true"}
    ).json()
    db = body["connection"]["database"]
    with connect(body["connection"]) as c:
        c.execute(
            sql.SQL("ALTER DATABASE {} IS_TEMPLATE true CONNECTION LIMIT 0").format(
                sql.Identifier(db)
            )
        )
    with pytest.raises(psycopg.OperationalError, match="too many connections"):
        connect(body["connection"])
    report = admin_api.post("/v1/admin/reconcile", json={}).json()
    found = [f for f in report["findings"] if f["object"] == db]
    assert [f["kind"] for f in found] == ["database_attributes"], found
    assert "is_template=True" in found[0]["detail"]
    assert "connection_limit=0" in found[0]["detail"]

    report = repaired(admin_api, {"repair": True})
    assert any(f["object"] == db and f["repaired"] for f in report["findings"]), report
    with fleet.admin_conn(REGION) as c:
        assert c.execute(
            "SELECT datistemplate, datallowconn, datconnlimit FROM pg_database WHERE datname = %s",
            (db,),
        ).fetchone() == (False, True, -1)
    with connect(body["connection"]) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_a_rotation_ends_the_sessions_of_the_old_password(api: Api, fleet: FleetUnderTest) -> None:
    body = create_ok(api, "rotated", region=REGION)
    pid = body["id"]
    ro = api.get(f"/v1/projects/{pid}/connection", params={"mode": "ro"}).json()
    rw_session = connect(body["connection"])
    ro_session = connect(ro)
    # A session opened with a leaked password must not outlive the rotation,
    # or it could set a password of its own choosing afterwards.
    r = api.post(f"/v1/projects/{pid}/rotate-password", json={})
    assert r.status_code == 200, r.text
    assert ended(rw_session) and ended(ro_session)
    with connect(r.json()["connection"]) as c:
        assert c.execute("SELECT current_user").fetchone() == (body["connection"]["user"],)
    # Rotating only `ro` leaves the rw sessions on the server alone (through
    # the routers too: test_router's rotation test).
    direct = {"direct": "true"}
    rw_session = connect(api.get(f"/v1/projects/{pid}/connection", params=direct).json())
    ro_session = connect(
        api.get(f"/v1/projects/{pid}/connection", params={"mode": "ro", **direct}).json()
    )
    r = api.post(f"/v1/projects/{pid}/rotate-password", json={"role": "ro"})
    assert r.status_code == 200, r.text
    assert ended(ro_session)
    assert not ended(rw_session)


def test_an_overlapping_rotation_ends_old_sessions_when_the_window_ends(api: Api) -> None:
    body = create_ok(api, "overlapped", region=REGION)
    pid = body["id"]
    old = connect(body["connection"])
    r = api.post(f"/v1/projects/{pid}/rotate-password", json={"overlap_s": 1, "role": "rw"})
    assert r.status_code == 200, r.text
    new = connect(r.json()["connection"])
    assert old.execute("SELECT 1").fetchone() == (1,)  # the window is open
    end = time.monotonic() + 30
    while True:
        ops = api.get(f"/v1/projects/{pid}/operations").json()["operations"]
        if any(o["type"] == "expire_credentials" and o["status"] == "finished" for o in ops):
            break
        assert time.monotonic() < end, ops
        time.sleep(0.2)
    assert ended(old)
    assert not ended(new)


def test_the_read_only_role_cannot_create_large_objects(api: Api) -> None:
    body = create_ok(api, "blobs", region=REGION)
    ro = api.get(f"/v1/projects/{body['id']}/connection", params={"mode": "ro"}).json()
    with connect(ro) as c:
        # Read-only transactions off: only privileges hold now.
        c.execute("SET default_transaction_read_only = off")
        for statement in (
            "SELECT lo_from_bytea(0, 'x')",
            "SELECT lo_create(0)",
            "SELECT lo_creat(-1)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(statement)
        assert c.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone() == (0,)
    with connect(body["connection"]) as c:  # the owner still can
        oid = c.execute("SELECT lo_from_bytea(0, 'hello')").fetchone()
        assert oid is not None
        assert c.execute("SELECT lo_get(%s)", (oid[0],)).fetchone() == (b"hello",)
    with connect(ro) as c:  # nor write to the owner's
        c.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT lo_put(%s, 0, 'x')", oid)
