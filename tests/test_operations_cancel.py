"""One operation per project, cancelling at every stage, and deadlines."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pgfleet.api.app import create_app
from pgfleet.auth import create_owner
from pgfleet.operations.runtime import OperationsRuntime
from pgfleet.platform.core import Platform
from pgfleet.tenants.provisioning import ensure_tenant_database_provisioned
from tests.helpers import Api, FleetUnderTest, create, create_ok, error_of, login, poll, run_psql


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
    pid = r.json()["id"]
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
        assert api.get(f"/v1/projects/{r.json()['id']}").status_code == 404


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


def test_a_step_cancelled_while_it_was_retried_is_closed(api: Api, fleet: FleetUnderTest) -> None:
    """Found by an attack: a create waiting for its region's server,
    cancelled between two attempts of its roles step, ended `cancelled`
    with that step still `running`. It is now closed, and says why."""
    from tests.helpers import until
    from tests.test_sql_errors import server_down

    with server_down(fleet, "eu-central-1"):
        r = create(
            api,
            "patient",
            region="eu-central-1",
            params={"wait": "false", "wait_for_region": "true"},
        )
        assert r.status_code == 202, r.text
        op_id = r.json()["operation"]["id"]

        def retrying() -> bool:
            op = api.get(f"/v1/operations/{op_id}").json()
            return any(s["name"] == "roles" and s["error"] for s in op["steps"])

        assert until(retrying, 30)
        assert api.post(f"/v1/operations/{op_id}/cancel").status_code == 202
        op = poll(api, op_id, timeout=30)
    assert op["status"] == "cancelled", op
    steps = {s["name"]: (s["status"], s["error"]) for s in op["steps"]}
    assert steps["roles"] == ("failed", "cancelled before it could finish"), steps
    assert all(status != "running" for status, _ in steps.values()), steps
