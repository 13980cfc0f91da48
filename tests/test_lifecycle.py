"""The project lifecycle through the API on real servers: rotate (with and
without an overlap window), pause and resume, change plan, delete."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from pgfleet.api.app import create_app
from pgfleet.auth import create_owner
from pgfleet.platform.core import Platform
from tests.helpers import (
    Api,
    FleetUnderTest,
    create_ok,
    error_of,
    login,
    refused,
    repaired,
    run_psql,
)


def test_rotate_password_new_works_old_stops(api: Api) -> None:
    body = create_ok(api, "keys", region="eu-central-1")
    pid = body["id"]
    old_rw = body["connection"]["uri"]
    old_ro = api.get(f"/v1/projects/{pid}/connection", params={"mode": "ro"}).json()["uri"]
    r = api.post(f"/v1/projects/{pid}/rotate-password")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["operation"]["type"] == "rotate_password"
    assert out["operation"]["status"] == "finished"
    assert [s["name"] for s in out["operation"]["steps"]] == [
        "generate",
        "apply",
        "store",
        "route",
        "schedule_expiry",
    ]
    new_rw = out["connection"]["uri"]
    assert new_rw != old_rw
    assert login(new_rw) == "ok"
    assert refused(login(old_rw))
    new_ro = api.get(f"/v1/projects/{pid}/connection", params={"mode": "ro"}).json()["uri"]
    assert login(new_ro) == "ok"
    assert refused(login(old_ro))


def test_rotate_only_the_read_only_role(api: Api) -> None:
    body = create_ok(api, "ro-only")
    pid = body["id"]
    old_ro = api.get(f"/v1/projects/{pid}/connection", params={"mode": "ro"}).json()["uri"]
    r = api.post(f"/v1/projects/{pid}/rotate-password", json={"role": "ro"})
    assert r.status_code == 200, r.text
    assert login(body["connection"]["uri"]) == "ok"  # rw untouched
    assert refused(login(old_ro))
    bad = api.post(f"/v1/projects/{pid}/rotate-password", json={"role": "admin"})
    assert bad.status_code == 422


def test_pause_ends_sessions_refuses_logins_and_resume_restores(
    api: Api, fleet: FleetUnderTest
) -> None:
    body = create_ok(api, "nap", region="ap-southeast-1")
    pid = body["id"]
    uri = body["connection"]["uri"]
    assert (
        api.post(f"/v1/projects/{pid}/sql", json={"query": "create table t (x int)"}).status_code
        == 200
    )
    api.post(f"/v1/projects/{pid}/sql", json={"query": "insert into t values (42)"})
    session = psycopg.connect(uri, autocommit=True)
    try:
        r = api.post(f"/v1/projects/{pid}/pause")
        assert r.status_code == 200, r.text
        assert r.json()["project"]["status"] == "paused"
        assert r.json()["operation"]["result"]["sessions_ended"] >= 1
        with pytest.raises(psycopg.OperationalError):
            session.execute("select 1")
    finally:
        session.close()
    assert refused(login(uri), "not permitted to log in")
    sql_r = api.post(f"/v1/projects/{pid}/sql", json={"query": "select 1"})
    assert sql_r.status_code == 409, sql_r.text
    # Pausing twice, or resuming an active project, is a clear 409.
    assert "paused" in error_of(api.post(f"/v1/projects/{pid}/pause"), 409)["message"]
    r = api.post(f"/v1/projects/{pid}/resume")
    assert r.status_code == 200, r.text
    assert r.json()["project"]["status"] == "active"
    assert login(uri) == "ok"
    res = run_psql(uri, "select x from t")
    assert res.stdout.strip() == "42"
    assert "active" in error_of(api.post(f"/v1/projects/{pid}/resume"), 409)["message"]


def test_change_plan_applies_limits_on_the_server(api: Api, fleet: FleetUnderTest) -> None:
    body = create_ok(api, "grow", region="eu-central-1", plan_type="free")
    pid = body["id"]
    db = body["connection"]["database"]
    r = api.post(f"/v1/projects/{pid}/plan", json={"plan": "pro"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["project"]["plan_type"] == "pro"
    placement = out["operation"]["result"]["placement"]
    assert placement["would_move"] is False
    with fleet.admin_conn("eu-central-1") as c:
        limits = dict(
            c.execute(
                "SELECT rolname, rolconnlimit FROM pg_roles WHERE rolname IN (%s, %s)",
                (f"{db}_rw", f"{db}_ro"),
            ).fetchall()
        )
        cfg = c.execute(
            "SELECT setconfig FROM pg_db_role_setting WHERE setrole = %s::regrole",
            (f"{db}_rw",),
        ).fetchone()
    assert limits == {f"{db}_rw": 60, f"{db}_ro": 60}
    assert cfg is not None and "statement_timeout=60000ms" in cfg[0]
    assert error_of(api.post(f"/v1/projects/{pid}/plan", json={"plan": "pro"}), 409)
    err = error_of(api.post(f"/v1/projects/{pid}/plan", json={"plan": "gold"}), 422)
    assert "free, pro, enterprise" in err["message"]


def test_change_plan_says_what_would_move(platform_factory: Any) -> None:
    p = platform_factory(placement="hybrid")
    _, token = create_owner(p, "carol")
    with TestClient(create_app(p)) as c:
        api = Api(c, token)
        body = create_ok(api, "free-one", region="eu-central-1", plan_type="free")
        assert body["hosted_region"] == "us-east-1"
        r = api.post(f"/v1/projects/{body['id']}/plan", json={"plan": "pro"})
        assert r.status_code == 200, r.text
        placement = r.json()["operation"]["result"]["placement"]
        assert placement == {
            **placement,
            "hosted_region": "us-east-1",
            "wanted_region": "eu-central-1",
            "would_move": True,
        }
        assert "eu-central-1" in placement["note"]
        # Nothing moved.
        assert api.get(f"/v1/projects/{body['id']}").json()["hosted_region"] == "us-east-1"


def test_delete_keeps_the_row_for_the_audit(api: Api, fleet: FleetUnderTest) -> None:
    body = create_ok(api, "gone", region="eu-central-1")
    pid = body["id"]
    r = api.delete(f"/v1/projects/{pid}")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["operation"]["type"] == "delete"
    assert [s["name"] for s in out["operation"]["steps"]] == [
        "block",
        "route",
        "drop_database",
        "drop_roles",
        "finish",
    ]
    assert out["project"]["status"] == "deleted" and out["project"]["deleted_at"]
    assert fleet.databases("eu-central-1") == set()
    assert "does not exist" in login(body["connection"]["uri"]) or "failed" in login(
        body["connection"]["uri"]
    )
    # The operations and the audit stay readable after the delete.
    ops = api.get(f"/v1/projects/{pid}/operations").json()["operations"]
    assert [o["type"] for o in ops] == ["delete", "provision"]
    actions = [e["action"] for e in api.get(f"/v1/projects/{pid}/audit").json()["entries"]]
    assert actions == ["project.delete", "project.create"]


def wait_for_expiry(api: Api, pid: str, count: int, timeout: float = 30) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        ops = api.get(f"/v1/projects/{pid}/operations").json()["operations"]
        done = [o for o in ops if o["type"] == "expire_credentials" and o["status"] == "finished"]
        if len(done) >= count:
            return done[0]
        assert time.monotonic() < end, ops
        time.sleep(0.2)


def test_rotate_with_overlap_keeps_old_credentials_until_the_window_ends(
    api: Api, admin_api: Api, fleet: FleetUnderTest
) -> None:
    body = create_ok(api, "overlap", region="eu-central-1")
    pid = body["id"]
    db = body["connection"]["database"]
    old_rw = body["connection"]["uri"]
    old_ro = api.get(f"/v1/projects/{pid}/connection", params={"mode": "ro"}).json()["uri"]

    r = api.post(f"/v1/projects/{pid}/rotate-password", json={"overlap_s": 2})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["connection"]["user"] == f"{db}_rw_alt"
    assert out["operation"]["result"]["old_credentials_expire_at"]
    new_rw = out["connection"]["uri"]
    new_ro = api.get(f"/v1/projects/{pid}/connection", params={"mode": "ro"}).json()["uri"]
    assert api.get(f"/v1/projects/{pid}/connection", params={"mode": "ro"}).json()["user"] == (
        f"{db}_ro_alt"
    )
    for uri in (old_rw, old_ro, new_rw, new_ro):
        assert login(uri) == "ok"
    # The alternate acts as the main role: what it creates belongs to _rw,
    # and the read-only credentials (old and new) read it.
    res = run_psql(new_rw, "create table t (x int); insert into t values (7); select current_user")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == f"{db}_rw"
    assert run_psql(old_rw, "insert into t values (8)").returncode == 0
    assert run_psql(new_ro, "select count(*) from t").stdout.strip() == "2"
    assert "read-only" in run_psql(new_ro, "insert into t values (9)").stderr
    sql_r = api.post(f"/v1/projects/{pid}/sql", json={"query": "select count(*) from t"})
    assert sql_r.status_code == 200, sql_r.text

    expiry = wait_for_expiry(api, pid, 1)
    assert sorted(expiry["result"]["expired"]) == sorted([f"{db}_rw", f"{db}_ro"])
    assert refused(login(old_rw))
    assert refused(login(old_ro))
    assert login(new_rw) == "ok" and login(new_ro) == "ok"
    audit = [e["action"] for e in api.get(f"/v1/projects/{pid}/audit").json()["entries"]]
    assert audit[0] == "project.expire_credentials"

    # Again: the credentials move back to the main roles, the alternates expire.
    r = api.post(f"/v1/projects/{pid}/rotate-password", json={"overlap_s": 1, "role": "rw"})
    assert r.status_code == 200, r.text
    back = r.json()["connection"]
    assert back["user"] == f"{db}_rw"
    assert login(back["uri"]) == "ok" and login(new_rw) == "ok"
    wait_for_expiry(api, pid, 2)
    assert refused(login(new_rw))
    assert login(back["uri"]) == "ok"
    assert login(new_ro) == "ok"  # ro was not rotated this time

    # The fleet is as it should be, and a delete takes the alternates too.
    assert admin_api.post("/v1/admin/reconcile").json()["findings"] == []
    assert api.delete(f"/v1/projects/{pid}").status_code == 200
    assert fleet.roles("eu-central-1") == set()


def test_rotate_overlap_out_of_range_is_422(api: Api) -> None:
    pid = create_ok(api, "bounds")["id"]
    for bad in (-1, 7 * 24 * 3600 + 1):
        err = error_of(
            api.post(f"/v1/projects/{pid}/rotate-password", json={"overlap_s": bad}), 422
        )
        assert "overlap_s" in err["message"] and "604800" in err["message"]
    assert [o["type"] for o in api.get(f"/v1/projects/{pid}/operations").json()["operations"]] == [
        "provision"
    ]


def test_rotating_a_paused_project_answers_200_without_credentials(api: Api) -> None:
    pid = create_ok(api, "sleeper")["id"]
    assert api.post(f"/v1/projects/{pid}/pause").status_code == 200
    r = api.post(f"/v1/projects/{pid}/rotate-password")
    assert r.status_code == 200, r.text
    assert r.json()["operation"]["status"] == "finished"
    assert r.json()["connection"] is None
    assert api.post(f"/v1/projects/{pid}/resume").status_code == 200
    uri = api.get(f"/v1/projects/{pid}/connection").json()["uri"]
    assert login(uri) == "ok"


def test_reconciler_expires_credentials_an_overlap_left_behind(
    api: Api, admin_api: Api, platform: Platform
) -> None:
    """An overlap window whose expiry never ran (its job lost or failed, say
    with the region down at the time) leaves a password no credential uses:
    the reconciler finds it and, repairing, expires it."""
    body = create_ok(api, "leftover")
    pid = body["id"]
    db = body["connection"]["database"]
    old_rw = body["connection"]["uri"]
    r = api.post(f"/v1/projects/{pid}/rotate-password", json={"overlap_s": 3600, "role": "rw"})
    assert r.status_code == 200, r.text
    new_rw = r.json()["connection"]["uri"]
    # While the window is open its expiry is pending: nothing to report.
    assert admin_api.post("/v1/admin/reconcile").json()["findings"] == []
    with platform.db.connection() as conn:
        gone = conn.execute(
            "DELETE FROM procrastinate_jobs WHERE task_name = 'pgfleet.expire_credentials' "
            "AND args->>'tenant_id' = %s RETURNING id",
            (pid,),
        ).fetchall()
    assert len(gone) == 1
    assert login(old_rw) == "ok"

    findings = admin_api.post("/v1/admin/reconcile").json()["findings"]
    assert [(f["kind"], f["object"]) for f in findings] == [("stale_credential", f"{db}_rw")]
    report = repaired(admin_api, {"repair": True})
    assert report["findings"][0]["action"] == "expire_credentials queued"
    expiry = wait_for_expiry(api, pid, 1)
    assert expiry["result"]["expired"] == [f"{db}_rw"]
    assert refused(login(old_rw))
    assert login(new_rw) == "ok"
    assert admin_api.post("/v1/admin/reconcile").json()["findings"] == []
