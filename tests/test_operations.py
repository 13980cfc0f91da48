"""Operations through the API: statuses and steps, wait=false, idempotency
keys, the project lifecycle (rotate, pause/resume, change plan, delete),
one operation per project, cancel, deadlines, the audit log, the reconciler,
and the CLI's ops commands. Real servers throughout."""

from __future__ import annotations

import re
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
from pgfleet.operations.locks import op_lock_key, resource_lock_key, resource_lock_key_sql
from pgfleet.operations.registry import Step
from pgfleet.operations.runner import _DURABLE, execute_operation
from pgfleet.operations.runtime import OperationsRuntime
from pgfleet.platform.core import Platform
from pgfleet.tenants.naming import tenant_db_name
from pgfleet.tenants.service import start_create_project
from pgfleet.tenants.spares import CLAIMED, drop_spares
from tests.helpers import (
    ROUTER_NO_ENTRY,
    Api,
    FleetUnderTest,
    create,
    create_ok,
    error_of,
    login,
    poll,
    repaired,
    until,
)
from tests.helpers import (
    finished as finished_op,
)

STEPS = ["place", "roles", "database", "privileges", "activate", "route"]


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
    assert {"create database", CLAIMED} & set(op["result"]["actions"])

    again = api.get(f"/v1/operations/{op['id']}").json()
    assert again["id"] == op["id"] and again["status"] == "finished"
    assert [s["name"] for s in again["steps"]] == STEPS
    listed = api.get(f"/v1/projects/{body['id']}/operations").json()["operations"]
    assert [o["id"] for o in listed] == [op["id"]]
    mine = api.get("/v1/operations").json()["operations"]
    assert [o["id"] for o in mine] == [op["id"]]
    assert api.get("/v1/operations", params={"status": "failed"}).json()["operations"] == []


def test_an_execution_leaves_no_lock_and_no_setting_behind(api: Api, platform: Platform) -> None:
    """The executor takes its two advisory locks and its session setting in
    one statement and gives them back in one: a project's lock key computed
    in SQL must be resource_lock_key's, or the lock would outlive the run on
    a pooled connection and hold every later operation of the project."""
    bad = platform.db._pool.get_stats().get("returns_bad", 0)
    made = [create_ok(api, f"locks {i}", region="eu-central-1") for i in range(3)]
    # Given back with a statement that worked: no connection closed for it.
    assert platform.db._pool.get_stats().get("returns_bad", 0) == bad
    keys = [resource_lock_key(uuid.UUID(p["id"])) for p in made]
    keys += [op_lock_key(uuid.UUID(p["operation"]["id"])) for p in made]
    with platform.db.connection() as conn:
        held = conn.execute(
            "SELECT (classid::int8 << 32) | objid::int8 FROM pg_locks "
            "WHERE locktype = 'advisory' AND objsubid = 1"
        ).fetchall()
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        ids = [uuid.UUID(int=0), uuid.UUID(int=(1 << 128) - 1), *(uuid.uuid4() for _ in range(200))]
        computed = conn.execute(
            f"SELECT {resource_lock_key_sql('t')} FROM unnest(%s::uuid[]) t",  # noqa: S608 (constant)
            (ids,),
        ).fetchall()
    assert not {k & 0xFFFFFFFFFFFFFFFF for k in keys} & {h for (h,) in held}
    assert [k for (k,) in computed] == [resource_lock_key(t) for t in ids]


def test_an_executor_whose_lock_wait_fails_keeps_no_lock(platform_factory: Any) -> None:
    """The executor takes the operation's lock and waits for its project's
    in one statement. If that wait fails (cancelled here; a deadlock would
    do the same), the operation's lock, which outlives the failed
    statement, must not stay with the pooled connection."""
    p: Platform = platform_factory(embedded_workers=0)  # the test runs it
    owner = create_owner(p, "waiter")[0]
    project, op_id = start_create_project(
        p, owner, name="held", region="eu-central-1", plan_type="free"
    )
    outcome: list[BaseException | str] = []

    def run() -> None:
        try:
            outcome.append(execute_operation(p, op_id, worker="test"))
        except BaseException as e:
            outcome.append(e)

    with p.db.connection() as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (resource_lock_key(project.id),))
        t = threading.Thread(target=run)
        t.start()
        waiter = until(
            lambda: holder.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone(),
            seconds=10,
        )
        holder.execute("SELECT pg_cancel_backend(%s)", (waiter[0],))
        t.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled)
        free = holder.execute("SELECT pg_try_advisory_lock(%s)", (op_lock_key(op_id),)).fetchone()
        assert free == (True,)
        holder.execute("SELECT pg_advisory_unlock_all()")
    assert execute_operation(p, op_id, worker="test") == "finished"


def test_a_record_that_must_flush_does_on_a_session_that_does_not(platform: Platform) -> None:
    """The lock connection commits progress records without a WAL flush; a
    final step's start and an operation's end name `_DURABLE` instead of
    wrapping themselves in BEGIN, SET LOCAL and COMMIT. Their commit must
    still have flushed its WAL when the statement returns (what any
    statement reads as the WAL's end inside the transaction is before
    its commit record), and the session must stay as it was."""
    with platform.db.connection() as conn:
        conn.execute("CREATE TABLE flushed (v int)")
        conn.execute("SET synchronous_commit TO off")
        try:
            for _ in range(20):
                # Read after the row's WAL record, before the commit's.
                row = conn.execute(
                    f"WITH {_DURABLE}, ins AS (INSERT INTO flushed SELECT 1 FROM durable "  # noqa: S608 (constant)
                    "RETURNING pg_current_wal_insert_lsn()::text) SELECT * FROM ins"
                ).fetchone()
                assert row is not None
                done = conn.execute(
                    "SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (row[0],)
                ).fetchone()
                assert done == (True,)
                assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
        finally:
            conn.execute("RESET synchronous_commit")


def test_a_final_step_cannot_be_skipped() -> None:
    """Past it an operation only goes forward: whether it ran must never be
    left to a predicate."""
    with pytest.raises(ValueError, match="a final step cannot be skipped"):
        Step("drop", lambda ctx: None, final=True, skip=lambda ctx: True)


def test_wait_false_answers_202_with_the_operation(api: Api) -> None:
    r = create(api, "later", region="ap-southeast-1", params={"wait": "false"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] in ("provisioning", "active")
    assert body["operation"]["type"] == "provision"
    # The 201 body's shape, without credentials yet: a client reads both one way.
    assert body["connection"] is None
    assert set(body) == set(create_ok(api, "now", region="ap-southeast-1"))
    op = poll(api, body["operation"]["id"])
    assert op["status"] == "finished"
    pid = body["id"]
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


def test_a_stuck_create_is_marked_failed_when_its_operation_gave_up(
    api: Api, admin_api: Api, platform: Platform
) -> None:
    """A project left `provisioning` by a create that failed or was
    cancelled, whose undo could not finish (the platform DB lost as it
    wrote): its caller was told it failed and never got its credentials,
    so a repair marks it failed instead of activating it. A project left
    `provisioning` whose create finished (a cancelled delete puts it back)
    is still converged and activated."""
    given_up = create_ok(api, "given up")["id"]
    finished = create_ok(api, "finished")["id"]
    with platform.db.connection() as conn:
        conn.execute(
            "UPDATE tenants SET status = 'provisioning' WHERE id = ANY(%s)",
            ([uuid.UUID(given_up), uuid.UUID(finished)],),
        )
        conn.execute(
            "UPDATE operations SET status = 'failed' WHERE tenant_id = %s AND type = 'provision'",
            (uuid.UUID(given_up),),
        )
    report = admin_api.post("/v1/admin/reconcile").json()
    stuck = {f["tenant_id"]: f for f in report["findings"] if f["kind"] == "stuck_provisioning"}
    assert "was failed" in stuck[given_up]["detail"], stuck
    assert "no operation is running" in stuck[finished]["detail"], stuck

    report = repaired(admin_api, {"repair": True})
    stuck = {f["tenant_id"]: f for f in report["findings"] if f["kind"] == "stuck_provisioning"}
    assert stuck[given_up]["repaired"] is True and "marked failed" in stuck[given_up]["action"]
    assert stuck[finished]["repaired"] is True
    gone = api.get(f"/v1/projects/{given_up}").json()
    assert gone["status"] == "failed", gone
    assert api.get(f"/v1/projects/{finished}").json()["status"] == "active"
    # What is left of it goes with a delete, as for any failed project.
    report = admin_api.post("/v1/admin/reconcile").json()
    assert {(f["kind"], f["tenant_id"]) for f in report["findings"]} == {
        ("failed_project", given_up)
    }, report
    finished_op(api, api.delete(f"/v1/projects/{given_up}"))
    assert admin_api.post("/v1/admin/reconcile").json()["findings"] == []


def spares(p: Platform, region: str) -> set[str]:
    """The prepared spares ready on `region`'s server: made, routed, and
    free for a create to take."""
    with p.db.connection() as c:
        return {
            tenant_db_name(r[0])
            for r in c.execute(
                "SELECT s.id FROM spares s JOIN servers v ON v.id = s.server_id "
                "WHERE s.state = 'ready' AND v.region = %s",
                (region,),
            )
        }


def test_provision_claims_a_prepared_spare_and_it_is_refilled(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    p = platform_factory(spare_databases=2)
    _, token = create_owner(p, "fred")
    OperationsRuntime.of(p).start_workers(1)
    end = time.monotonic() + 30
    while len(spares(p, "eu-central-1")) < 2:
        assert time.monotonic() < end, "spares were not made"
        time.sleep(0.1)
    before = spares(p, "eu-central-1")
    with TestClient(create_app(p)) as c:
        api = Api(c, token)
        body = create_ok(api, "quick", region="eu-central-1")
        db = body["connection"]["database"]
        assert body["operation"]["result"]["actions"] == [CLAIMED]
        # The spare it took, made under its name ahead: routed with it, so
        # the route step had nothing to publish.
        assert before - spares(p, "eu-central-1") == {db}
        # The steps the claim left nothing to do were skipped, and said so.
        steps = {s["name"]: s["status"] for s in body["operation"]["steps"]}
        assert steps == {
            "place": "finished",
            "roles": "finished",
            "database": "skipped",
            "privileges": "skipped",
            "activate": "finished",
            "route": "skipped",
        }, steps
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
        assert login(body["connection"]["uri"].replace(body["connection"]["user"], f"{db}_ro"))
        other = create_ok(api, "neighbour", region="eu-central-1")["connection"]
        # The neighbour's own credentials, aimed at this database: refused.
        foreign = other["uri"].replace(f"/{other['database']}?", f"/{db}?")
        assert other["user"] in foreign and f"/{db}?" in foreign
        # The router admits only this project's own roles to it (its HBA).
        assert ROUTER_NO_ENTRY in login(foreign)
        # The workers make new spares.
        end = time.monotonic() + 30
        while len(spares(p, "eu-central-1")) < 2:
            assert time.monotonic() < end, "spares were not refilled"
            time.sleep(0.1)
        metrics = p.metrics.render().decode()  # what /metrics serves
        assert re.search(r'pgfleet_spares_claimed_total\{region="eu-central-1"\} [1-9]', metrics)
        assert re.search(r'pgfleet_spares_made_total\{region="eu-central-1"\} [1-9]', metrics)


def test_provision_without_spares_creates_the_database(platform_factory: Any) -> None:
    p = platform_factory(spare_databases=0)
    _, token = create_owner(p, "gina")
    with TestClient(create_app(p)) as c:
        api = Api(c, token)
        server = p.servers.all(enabled_only=True)[0]
        drop_spares(p, server)
        body = create_ok(api, "slow", region=server.region)
        assert "create database" in body["operation"]["result"]["actions"]


def test_every_post_takes_an_idempotency_key(api: Api, admin_api: Api) -> None:
    key = {"Idempotency-Key": "tok-1"}
    first = api.post("/v1/tokens", json={"name": "ci"}, headers=key)
    assert first.status_code == 201, first.text
    again = api.post("/v1/tokens", json={"name": "ci"}, headers=key)
    assert again.status_code == 201 and again.json() == first.json()
    assert [t["name"] for t in api.get("/v1/tokens").json()["tokens"]].count("ci") == 1

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
