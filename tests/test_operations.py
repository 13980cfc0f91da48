"""Operations through the API: statuses and steps, wait=false, idempotency
keys, the project lifecycle (rotate, pause/resume, change plan, delete),
one operation per project, cancel, deadlines, the audit log, the reconciler,
and the CLI's ops commands. Real servers throughout."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

from pgfleet.api.app import create_app
from pgfleet.auth import create_owner
from pgfleet.operations.runtime import OperationsRuntime
from pgfleet.platform.core import Platform
from pgfleet.tenants.provisioning import ensure_tenant_database_provisioned
from tests.helpers import Api, FleetUnderTest, run_psql

STEPS = ["place", "roles", "database", "privileges", "activate"]


def create(api: Api, name: str = "shop", **kw: Any) -> Any:
    params = kw.pop("params", {})
    headers = kw.pop("headers", {})
    return api.post("/v1/projects", json={"name": name, **kw}, params=params, headers=headers)


def create_ok(api: Api, name: str = "shop", **kw: Any) -> dict[str, Any]:
    r = create(api, name, **kw)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def error_of(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    return err


def poll(api: Api, op_id: str, timeout: float = 30) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        op: dict[str, Any] = api.get(f"/v1/operations/{op_id}").json()
        if op["status"] in ("finished", "failed", "cancelled"):
            return op
        assert time.monotonic() < end, op
        time.sleep(0.05)


def login(uri: str) -> str:
    res = run_psql(uri, "select 1")
    return "ok" if res.returncode == 0 else res.stderr


# ---- operations are visible --------------------------------------------------


def test_create_returns_its_finished_operation_with_steps(api: Api) -> None:
    body = create_ok(api, "ops", region="eu-central-1")
    op = body["operation"]
    assert op["type"] == "provision"
    assert op["status"] == "finished"
    assert op["project_id"] == body["id"]
    assert [s["name"] for s in op["steps"]] == STEPS
    assert all(s["status"] == "finished" and s["attempts"] == 1 for s in op["steps"])
    assert all(s["duration_ms"] is not None and s["duration_ms"] >= 0 for s in op["steps"])
    assert op["attempts"] == 1
    assert op["duration_ms"] > 0
    assert op["created_at"] <= op["started_at"] <= op["finished_at"]
    assert op["actor"] == "alice"
    assert {"create database", "claim spare database"} & set(op["result"]["actions"])

    again = api.get(f"/v1/operations/{op['id']}").json()
    assert again["id"] == op["id"] and again["status"] == "finished"
    assert [s["name"] for s in again["steps"]] == STEPS
    listed = api.get(f"/v1/projects/{body['id']}/operations").json()["operations"]
    assert [o["id"] for o in listed] == [op["id"]]
    mine = api.get("/v1/operations").json()["operations"]
    assert [o["id"] for o in mine] == [op["id"]]
    assert api.get("/v1/operations", params={"status": "failed"}).json()["operations"] == []


def test_wait_false_answers_202_with_the_operation(api: Api) -> None:
    r = create(api, "later", region="ap-southeast-1", params={"wait": "false"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["project"]["status"] in ("provisioning", "active")
    assert body["operation"]["type"] == "provision"
    assert body["connection"] is None
    op = poll(api, body["operation"]["id"])
    assert op["status"] == "finished"
    pid = body["project"]["id"]
    assert api.get(f"/v1/projects/{pid}").json()["status"] == "active"
    uri = api.get(f"/v1/projects/{pid}/connection").json()["uri"]
    assert login(uri) == "ok"


def test_unknown_and_foreign_operations_are_404(
    api: Api, platform: Platform, client: TestClient
) -> None:
    body = create_ok(api, "mine")
    assert error_of(api.get(f"/v1/operations/{uuid.uuid4()}"), 404)["code"] == (
        "operation_not_found"
    )
    assert error_of(api.get("/v1/operations/not-a-uuid"), 404)
    assert error_of(api.post(f"/v1/operations/{uuid.uuid4()}/cancel"), 404)
    _, bob_token = create_owner(platform, "bob")
    bob = Api(client, bob_token)
    assert error_of(bob.get(f"/v1/operations/{body['operation']['id']}"), 404)
    assert error_of(bob.post(f"/v1/operations/{body['operation']['id']}/cancel"), 404)
    assert error_of(bob.get(f"/v1/projects/{body['id']}/operations"), 404)
    assert error_of(bob.get(f"/v1/projects/{body['id']}/audit"), 404)
    assert bob.get("/v1/operations").json()["operations"] == []


def test_admin_sees_everyones_operations(api: Api, admin_api: Api) -> None:
    body = create_ok(api, "watched")
    op = admin_api.get(f"/v1/operations/{body['operation']['id']}")
    assert op.status_code == 200, op.text
    assert body["operation"]["id"] in [
        o["id"] for o in admin_api.get("/v1/operations").json()["operations"]
    ]


# ---- idempotency keys ------------------------------------------------------------


def test_idempotency_key_replays_and_creates_nothing_new(api: Api, fleet: FleetUnderTest) -> None:
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = create(api, "once", region="eu-central-1", headers=key)
    assert first.status_code == 201, first.text
    second = create(api, "once", region="eu-central-1", headers=key)
    assert second.status_code == 201, second.text
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert second.json() == first.json()
    assert len(api.get("/v1/projects").json()["projects"]) == 1
    assert len(fleet.databases("eu-central-1")) == 1
    # A new key is a new request.
    third = create(api, "once", region="eu-central-1", headers={"Idempotency-Key": "other"})
    assert third.status_code == 201, third.text
    assert third.json()["id"] != first.json()["id"]


def test_idempotency_key_with_another_body_is_422(api: Api) -> None:
    key = {"Idempotency-Key": "k-1"}
    assert create(api, "a", headers=key).status_code == 201
    err = error_of(create(api, "b", headers=key), 422)
    assert err["code"] == "idempotency_key_reused"
    assert "different request" in err["message"]
    assert len(api.get("/v1/projects").json()["projects"]) == 1


@pytest.mark.parametrize("bad", ["", " ", "x" * 256, "clé".encode()])
def test_malformed_idempotency_key_is_422(api: Api, bad: str | bytes) -> None:
    r = create(api, "a", headers={"Idempotency-Key": bad})
    err = error_of(r, 422)
    assert "Idempotency-Key" in err["message"]
    assert "255" in err["message"]
    assert api.get("/v1/projects").json()["projects"] == []


def test_failed_request_with_a_key_can_be_retried(api: Api) -> None:
    key = {"Idempotency-Key": "retry-me"}
    assert error_of(create(api, "a", region="mars-1", headers=key), 422)
    assert create(api, "a", region="us-east-1", headers=key).status_code == 201


def test_idempotent_response_is_stored_encrypted(api: Api, platform: Platform) -> None:
    body = create_ok(api, "secretive", headers={"Idempotency-Key": "enc"})
    with platform.db.connection() as conn:
        raw = conn.execute("SELECT response::text FROM idempotency_keys").fetchone()
    assert raw is not None
    assert body["connection"]["password"] not in raw[0]


def test_lifecycle_posts_take_idempotency_keys(api: Api) -> None:
    pid = create_ok(api, "rot")["id"]
    key = {"Idempotency-Key": "rotate-1"}
    first = api.post(f"/v1/projects/{pid}/rotate-password", headers=key)
    assert first.status_code == 200, first.text
    again = api.post(f"/v1/projects/{pid}/rotate-password", headers=key)
    assert again.json()["operation"]["id"] == first.json()["operation"]["id"]
    ops = api.get(f"/v1/projects/{pid}/operations").json()["operations"]
    assert [o["type"] for o in ops] == ["rotate_password", "provision"]


# ---- the lifecycle ------------------------------------------------------------------


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
        "schedule_expiry",
    ]
    new_rw = out["connection"]["uri"]
    assert new_rw != old_rw
    assert login(new_rw) == "ok"
    assert "password authentication failed" in login(old_rw)
    new_ro = api.get(f"/v1/projects/{pid}/connection", params={"mode": "ro"}).json()["uri"]
    assert login(new_ro) == "ok"
    assert "password authentication failed" in login(old_ro)


def test_rotate_only_the_read_only_role(api: Api) -> None:
    body = create_ok(api, "ro-only")
    pid = body["id"]
    old_ro = api.get(f"/v1/projects/{pid}/connection", params={"mode": "ro"}).json()["uri"]
    r = api.post(f"/v1/projects/{pid}/rotate-password", json={"role": "ro"})
    assert r.status_code == 200, r.text
    assert login(body["connection"]["uri"]) == "ok"  # rw untouched
    assert "password authentication failed" in login(old_ro)
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
    assert "not permitted to log in" in login(uri)
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


# ---- one operation per project, cancel, deadlines ---------------------------------


def test_second_operation_on_a_project_is_409_naming_the_running_one(api: Api, held: Any) -> None:
    pid = create_ok(api, "busy")["id"]
    reached, release = held("pause.block_logins.before")
    r = api.post(f"/v1/projects/{pid}/pause", params={"wait": "false"})
    assert r.status_code == 202, r.text
    running = r.json()["operation"]["id"]
    reached()
    try:
        err = error_of(api.post(f"/v1/projects/{pid}/rotate-password"), 409)
        assert running in err["message"]
        assert "pause" in err["message"]
        err = error_of(api.delete(f"/v1/projects/{pid}"), 409)
        assert running in err["message"]
        # Another project is not held up.
        assert create(api, "free-to-go").status_code == 201
    finally:
        release()
    assert poll(api, running)["status"] == "finished"
    assert api.post(f"/v1/projects/{pid}/resume").status_code == 200


def test_a_repair_waits_for_the_running_operation(api: Api, held: Any, platform: Platform) -> None:
    """ensure_tenant_database_provisioned (the reconciler's repair) takes the
    project's lock, which the operation's executor holds: it runs after."""
    pid = create_ok(api, "locked")["id"]
    reached, release = held("rotate_password.apply.before")
    r = api.post(f"/v1/projects/{pid}/rotate-password", params={"wait": "false"})
    assert r.status_code == 202, r.text
    op_id = r.json()["operation"]["id"]
    reached()
    done = threading.Event()

    def repair() -> None:
        ensure_tenant_database_provisioned(pid, "us-east-1", platform=platform)
        done.set()

    t = threading.Thread(target=repair)
    t.start()
    try:
        assert not done.wait(1.0), "the repair ran while the rotation was between steps"
    finally:
        release()
    t.join(timeout=30)
    assert done.is_set()
    assert poll(api, op_id)["status"] == "finished"
    c = api.get(f"/v1/projects/{pid}/connection").json()
    assert run_psql(c["uri"], "select 1").returncode == 0


def test_cancel_a_running_provision_leaves_nothing(
    api: Api, held: Any, fleet: FleetUnderTest
) -> None:
    reached, release = held("provision.database.after")
    r = create(api, "halt", region="eu-central-1", params={"wait": "false"})
    assert r.status_code == 202, r.text
    op_id = r.json()["operation"]["id"]
    pid = r.json()["project"]["id"]
    reached()
    c = api.post(f"/v1/operations/{op_id}/cancel")
    assert c.status_code == 202, c.text
    assert c.json()["cancel_requested"] is True
    release()
    op = poll(api, op_id)
    assert op["status"] == "cancelled", op
    assert fleet.databases("eu-central-1") == set()
    assert fleet.roles("eu-central-1") == set()
    assert api.get(f"/v1/projects/{pid}").status_code == 404
    row = api.get("/v1/projects", params={"include_deleted": "true"}).json()["projects"][0]
    assert row["status"] == "deleted"
    # Cancelling an ended operation is 409 with its state.
    err = error_of(api.post(f"/v1/operations/{op_id}/cancel"), 409)
    assert "cancelled" in err["message"]


def test_cancel_of_a_finished_operation_is_409(api: Api) -> None:
    body = create_ok(api, "done")
    err = error_of(api.post(f"/v1/operations/{body['operation']['id']}/cancel"), 409)
    assert "already finished" in err["message"]


def test_cancel_past_the_point_of_no_return_is_409(
    api: Api, held: Any, fleet: FleetUnderTest
) -> None:
    pid = create_ok(api, "committed", region="ap-southeast-1")["id"]
    reached, release = held("delete.drop_database.before")
    r = api.delete(f"/v1/projects/{pid}", params={"wait": "false"})
    op_id = r.json()["operation"]["id"]
    reached()
    try:
        err = error_of(api.post(f"/v1/operations/{op_id}/cancel"), 409)
        assert "point of no return" in err["message"]
    finally:
        release()
    assert poll(api, op_id)["status"] == "finished"
    assert fleet.databases("ap-southeast-1") == set()


def test_cancel_a_delete_before_it_drops_restores_the_project(
    api: Api, held: Any, fleet: FleetUnderTest
) -> None:
    body = create_ok(api, "reprieve", region="eu-central-1")
    pid = body["id"]
    reached, release = held("delete.block.after")
    op_id = api.delete(f"/v1/projects/{pid}", params={"wait": "false"}).json()["operation"]["id"]
    reached()
    assert api.post(f"/v1/operations/{op_id}/cancel").status_code == 202
    release()
    assert poll(api, op_id)["status"] == "cancelled"
    assert api.get(f"/v1/projects/{pid}").json()["status"] == "active"
    assert login(body["connection"]["uri"]) == "ok"


def test_cancel_a_scheduled_operation_with_no_worker(platform_factory: Any) -> None:
    p = platform_factory(embedded_workers=0)
    _, token = create_owner(p, "dave")
    with TestClient(create_app(p)) as c:
        api = Api(c, token)
        r = create(api, "never", params={"wait": "false"})
        assert r.status_code == 202, r.text
        op = r.json()["operation"]
        assert op["status"] == "scheduled"
        out = api.post(f"/v1/operations/{op['id']}/cancel")
        assert out.status_code == 200, out.text
        assert out.json()["status"] == "cancelled"
        assert api.get(f"/v1/projects/{r.json()['project']['id']}").status_code == 404


def test_operation_past_its_deadline_shows_in_health(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    p = platform_factory(embedded_workers=0, operation_deadline_s=0.5)
    _, token = create_owner(p, "erin")
    with TestClient(create_app(p)) as c:
        api = Api(c, token)
        r = create(api, "stuck", params={"wait": "false"})
        op_id = r.json()["operation"]["id"]
        time.sleep(0.7)
        health = c.get("/health").json()
        assert health["status"] == "degraded"
        assert health["operations"]["past_deadline"] == 1
        assert [m["id"] for m in health["operations"]["missed"]] == [op_id]
        # A worker that finally picks it up fails it for its deadline and undoes it.
        OperationsRuntime.of(p).start_workers(1)
        op = poll(api, op_id)
        assert op["status"] == "failed"
        assert "deadline" in op["error"]
        assert op["deadline_missed"] is True
        assert c.get("/health").json()["operations"]["past_deadline"] == 0
    assert fleet.databases("us-east-1") == set()


# ---- audit ---------------------------------------------------------------------------


def test_audit_log_says_who_did_what(api: Api, admin_api: Api) -> None:
    pid = create_ok(api, "audited")["id"]
    api.post(f"/v1/projects/{pid}/rotate-password")
    admin_api.post(f"/v1/projects/{pid}/pause")
    entries = api.get(f"/v1/projects/{pid}/audit").json()["entries"]
    assert [(e["actor"], e["action"]) for e in entries] == [
        ("admin admin", "project.pause"),
        ("alice", "project.rotate_password"),
        ("alice", "project.create"),
    ]
    assert all(e["operation_id"] and e["project_id"] == pid for e in entries)
    assert entries[-1]["details"]["region"] == "us-east-1"
    everything = admin_api.get("/v1/admin/audit").json()["entries"]
    assert [e["action"] for e in everything][:3] == [
        "project.pause",
        "project.rotate_password",
        "project.create",
    ]
    assert api.get("/v1/admin/audit").status_code == 403


# ---- reconciler -----------------------------------------------------------------------


@pytest.fixture
def orphans(fleet: FleetUnderTest) -> Iterator[dict[str, str]]:
    """Hand-made orphans on eu-central-1: an empty database with roles, a
    database holding a table, and roles alone."""
    names = {k: f"tenant_{str(uuid.uuid4()).replace('-', '_')}" for k in ("empty", "data", "roles")}
    with fleet.admin_conn("eu-central-1") as c:
        for key in ("empty", "data", "roles"):
            n = names[key]
            c.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(n)))
            c.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'orphan-pw' IN ROLE {}").format(
                    sql.Identifier(n + "_rw"), sql.Identifier(n)
                )
            )
        for key in ("empty", "data"):
            c.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(names[key]), sql.Identifier(names[key] + "_rw")
                )
            )
    server = fleet.server("eu-central-1")
    login = {"user": names["data"] + "_rw", "password": "orphan-pw"}
    with psycopg.connect(
        **{**fleet.fleet.conninfo(server, names["data"]), **login}, autocommit=True
    ) as c:
        c.execute("CREATE TABLE precious (x int)")
    yield names


def repaired(admin_api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """A repair is a `reconcile` operation: 202 at once, its report in its
    result once it finished."""
    started = admin_api.post("/v1/admin/reconcile", json=body)
    assert started.status_code in (200, 202), started.text
    op = started.json()
    assert op["type"] == "reconcile" and op["project_id"] is None
    done = poll(admin_api, op["id"])
    assert done["status"] == "finished", done
    report: dict[str, Any] = done["result"]["report"]
    return report


def test_reconciler_reports_and_repairs_without_losing_data(
    api: Api, admin_api: Api, fleet: FleetUnderTest, orphans: dict[str, str]
) -> None:
    ok = create_ok(api, "fine", region="eu-central-1")
    broken = create_ok(api, "broken", region="eu-central-1")
    bdb = broken["connection"]["database"]
    with fleet.admin_conn("eu-central-1") as c:
        c.execute(sql.SQL("ALTER DATABASE {} OWNER TO CURRENT_USER").format(sql.Identifier(bdb)))
        c.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO PUBLIC").format(sql.Identifier(bdb)))
    lost = create_ok(api, "lost", region="us-east-1")
    with fleet.admin_conn("us-east-1") as c:
        c.execute(
            sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                sql.Identifier(lost["connection"]["database"])
            )
        )

    report = admin_api.post("/v1/admin/reconcile").json()
    kinds = {(f["kind"], f["object"]) for f in report["findings"]}
    assert ("orphan_database", orphans["empty"]) in kinds
    assert ("orphan_database", orphans["data"]) in kinds
    assert ("orphan_roles", orphans["roles"]) in kinds
    assert ("wrong_owner", bdb) in kinds
    assert ("public_connect", bdb) in kinds
    assert ("missing_database", lost["connection"]["database"]) in kinds
    assert not any(f["object"] == ok["connection"]["database"] for f in report["findings"])
    assert all(not f["repaired"] for f in report["findings"])
    assert orphans["empty"] in fleet.databases("eu-central-1")  # report only

    report = repaired(admin_api, {"repair": True})
    by_obj = {f["object"]: f for f in report["findings"]}
    assert by_obj[orphans["empty"]]["repaired"] is True
    assert by_obj[orphans["data"]]["repaired"] is False
    assert "force" in by_obj[orphans["data"]]["action"]
    dbs = fleet.databases("eu-central-1")
    assert orphans["empty"] not in dbs
    assert orphans["data"] in dbs  # it holds data: kept
    assert orphans["roles"] not in fleet.roles("eu-central-1")
    assert bdb in dbs
    assert login(broken["connection"]["uri"]) == "ok"
    assert lost["connection"]["database"] in fleet.databases("us-east-1")
    assert login(lost["connection"]["uri"]) == "ok"
    with fleet.admin_conn("eu-central-1") as c:
        owner = c.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (bdb,)
        ).fetchone()
    assert owner == (f"{bdb}_rw",)

    report = repaired(admin_api, {"repair": True, "force": True})
    assert orphans["data"] not in fleet.databases("eu-central-1")
    assert {f["kind"] for f in report["findings"]} <= {"orphan_database", "orphan_roles"}
    report = admin_api.post("/v1/admin/reconcile").json()
    assert report["findings"] == []
    last = admin_api.get("/v1/admin/reconcile").json()
    assert last["findings"] == [] and last["actor"] == "admin admin"
    assert api.post("/v1/admin/reconcile").status_code == 403


# ---- rotation with an overlap window ---------------------------------------------------


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
    assert "password authentication failed" in login(old_rw)
    assert "password authentication failed" in login(old_ro)
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
    assert "password authentication failed" in login(new_rw)
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


# ---- spare databases ---------------------------------------------------------------


def spares(fleet: FleetUnderTest, region: str) -> set[str]:
    with fleet.admin_conn(region) as c:
        return {
            r[0]
            for r in c.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'pgfleet\\_spare\\_%'"
            )
        }


def test_provision_claims_a_spare_database_and_it_is_refilled(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    p = platform_factory(spare_databases=2)
    _, token = create_owner(p, "fred")
    OperationsRuntime.of(p).start_workers(1)
    end = time.monotonic() + 30
    while len(spares(fleet, "eu-central-1")) < 2:
        assert time.monotonic() < end, "spares were not made"
        time.sleep(0.1)
    before = spares(fleet, "eu-central-1")
    with TestClient(create_app(p)) as c:
        api = Api(c, token)
        body = create_ok(api, "quick", region="eu-central-1")
        db = body["connection"]["database"]
        assert "claim spare database" in body["operation"]["result"]["actions"]
        assert len(before - spares(fleet, "eu-central-1")) == 1  # one was renamed
        # It is an ordinary project database: owned by _rw, closed to PUBLIC,
        # reachable with the project's credentials only.
        with fleet.admin_conn("eu-central-1") as a:
            owner, acl = a.execute(
                "SELECT pg_get_userbyid(datdba), datacl::text FROM pg_database WHERE datname = %s",
                (db,),
            ).fetchone() or (None, None)
        assert owner == f"{db}_rw"
        assert acl is not None and "=Tc/" not in acl and not acl.startswith("{=")
        assert login(body["connection"]["uri"]) == "ok"
        other = create_ok(api, "neighbour", region="eu-central-1")["connection"]
        # The neighbour's own credentials, aimed at this database: refused.
        foreign = other["uri"].replace(f"/{other['database']}?", f"/{db}?")
        assert other["user"] in foreign and f"/{db}?" in foreign
        assert "pg_hba.conf rejects connection" in login(foreign)
        # The workers make a new spare.
        end = time.monotonic() + 30
        while len(spares(fleet, "eu-central-1")) < 2:
            assert time.monotonic() < end, "spares were not refilled"
            time.sleep(0.1)


def test_provision_without_spares_creates_the_database(platform_factory: Any) -> None:
    p = platform_factory(spare_databases=0)
    _, token = create_owner(p, "gina")
    with TestClient(create_app(p)) as c:
        api = Api(c, token)
        with p.servers.admin_connection(p.servers.all(enabled_only=True)[0]) as a:
            for (name,) in a.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'pgfleet\\_spare\\_%'"
            ).fetchall():
                a.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
        region = p.servers.all(enabled_only=True)[0].region
        body = create_ok(api, "slow", region=region)
        assert "create database" in body["operation"]["result"]["actions"]


def test_every_post_takes_an_idempotency_key(api: Api, admin_api: Api) -> None:
    key = {"Idempotency-Key": "tok-1"}
    first = api.post("/v1/tokens", json={"name": "ci"}, headers=key)
    assert first.status_code == 201, first.text
    again = api.post("/v1/tokens", json={"name": "ci"}, headers=key)
    assert again.status_code == 201 and again.json() == first.json()
    assert [t["name"] for t in api.get("/v1/tokens").json()].count("ci") == 1

    pid = create_ok(api, "rows")["id"]
    run = {"query": "create table t (x int)"}
    assert api.post(f"/v1/projects/{pid}/sql", json=run).status_code == 200
    insert = {"query": "insert into t values (1)"}
    k = {"Idempotency-Key": "insert-once"}
    r1 = api.post(f"/v1/projects/{pid}/sql", json=insert, headers=k)
    r2 = api.post(f"/v1/projects/{pid}/sql", json=insert, headers=k)
    assert r1.status_code == r2.status_code == 200, (r1.text, r2.text)
    assert r2.headers.get("Idempotent-Replayed") == "true"
    count = api.post(f"/v1/projects/{pid}/sql", json={"query": "select count(*) from t"})
    assert count.json()["rows"] == [[1]]
    err = error_of(api.post(f"/v1/projects/{pid}/sql", json={"query": "select 2"}, headers=k), 422)
    assert err["code"] == "idempotency_key_reused"

    ok = {"Idempotency-Key": "owner-1"}
    o1 = admin_api.post("/v1/admin/owners", json={"name": "hank"}, headers=ok)
    o2 = admin_api.post("/v1/admin/owners", json={"name": "hank"}, headers=ok)
    assert o1.status_code == o2.status_code == 201
    assert o1.json()["owner"]["id"] == o2.json()["owner"]["id"]
    # Keys belong to their owner: the same key from someone else is theirs alone.
    other = api.post("/v1/tokens", json={"name": "x"}, headers=ok)
    assert other.status_code == 201, other.text


@pytest.mark.usefixtures("cli_env")
def test_cli_status_shows_operations_past_their_deadline(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    from psycopg.conninfo import make_conninfo
    from typer.testing import CliRunner

    from pgfleet.cli import app as cli_app
    from pgfleet.config import get_settings
    from pgfleet.tenants import service

    p = platform_factory(embedded_workers=0, operation_deadline_s=0.2)
    owner = create_owner(p, "ivy")[0]
    _, op_id = service.start_create_project(
        p, owner, name="late", region="us-east-1", plan_type="free"
    )
    time.sleep(0.4)
    env = {
        "COLUMNS": "250",
        "PGFLEET_HOME": str(fleet.settings.home),
        "PGFLEET_PORT_BASE": str(fleet.settings.port_base),
        "PGFLEET_PLATFORM_DSN": make_conninfo(**p.conninfo),
    }
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(cli_app, ["status"], env=env)
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 0, (res.output, res.exception)
    assert "operations: 1 scheduled, 0 running" in res.stdout, res.stdout
    assert "1 PAST THEIR DEADLINE" in res.stdout
    assert str(op_id) in res.stdout and "provision" in res.stdout


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
    assert "password authentication failed" in login(old_rw)
    assert login(new_rw) == "ok"
    assert admin_api.post("/v1/admin/reconcile").json()["findings"] == []
