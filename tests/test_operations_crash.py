"""Crash safety with real processes: workers killed with SIGKILL at every
step boundary (and inside steps), two workers racing, the platform DB
connection killed mid-step, a regional server down while an operation runs.

Every test checks what a user would: the operation ends, the project is
right on its regional server, and nothing is orphaned or duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgfleet.operations.runner import execute_operation
from pgfleet.operations.runtime import OperationsRuntime
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from pgfleet.tenants import service
from pgfleet.tenants.naming import tenant_db_name
from pgfleet.tenants.spares import CLAIMED, refill_spares
from tests.helpers import FleetUnderTest, free_port_block, refused, run_psql

FAST = {"embedded_workers": 0, "worker_heartbeat_s": 0.3, "worker_stalled_s": 1.5}


class Workers:
    """Worker processes (`python -m pgfleet worker`) on one test's platform DB."""

    def __init__(self, platform: Platform, fleet: FleetUnderTest, folder: Path) -> None:
        self.platform = platform
        self.fleet = fleet
        self.folder = folder
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self, failpoints: str = "") -> dict[str, str]:
        """What a pgfleet process on this test's platform DB runs with."""
        s = self.fleet.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGFLEET_", "PG"))}
        env.update(
            PGFLEET_HOME=str(s.home),
            PGFLEET_PORT_BASE=str(s.port_base),
            PGFLEET_FSYNC="false",
            PGFLEET_BACKUP_SCHEDULE="false",
            PGFLEET_PLATFORM_DSN=make_conninfo(**self.platform.conninfo),
            PGFLEET_WORKER_HEARTBEAT_S=str(FAST["worker_heartbeat_s"]),
            PGFLEET_WORKER_STALLED_S=str(FAST["worker_stalled_s"]),
            PGFLEET_OPERATION_DEADLINE_S=str(self.platform.settings.operation_deadline_s),
            PGFLEET_FAILPOINTS=failpoints,
            # No refill of prepared spares: a create takes a spare only if
            # the test made one (a spare is taken when the project is
            # recorded, not by the worker).
            PGFLEET_SPARE_DATABASES="0",
            PGFLEET_FAILPOINT_DIR=str(self.folder),
        )
        return env

    def start(self, failpoints: str = "") -> subprocess.Popen[bytes]:
        with (self.folder / f"worker-{len(self.procs)}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pgfleet", "worker", "--concurrency", "2"],
                env=self.env(failpoints),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def reached(self, name: str, timeout: float = 60) -> None:
        marker = self.folder / f"{name}.reached"
        end = time.monotonic() + timeout
        while not marker.exists():
            for p in self.procs:
                assert p.poll() is None or p.returncode == -signal.SIGKILL, self.logs()
            assert time.monotonic() < end, f"failpoint {name} not reached\n{self.logs()}"
            time.sleep(0.02)

    def release(self, name: str) -> None:
        (self.folder / f"{name}.release").touch()

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(
            f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}"
            for f in sorted(self.folder.glob("worker-*.log"))
        )

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def quiet_platform(platform_factory: Any) -> Platform:
    """A platform whose process runs no worker: only the test's processes do."""
    p: Platform = platform_factory(**FAST)
    return p


@pytest.fixture
def workers(quiet_platform: Platform, fleet: FleetUnderTest, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(quiet_platform, fleet, tmp_path)
    yield w
    w.stop_all()


@pytest.fixture
def someone(quiet_platform: Platform) -> Owner:
    from pgfleet.auth import create_owner

    return create_owner(quiet_platform, "crashy")[0]


def wait_op(platform: Platform, op_id: uuid.UUID, workers: Workers, timeout: float = 60) -> Any:
    op = OperationsRuntime.of(platform).wait(op_id, timeout)
    assert op.status in ("finished", "failed", "cancelled"), (op, workers.logs())
    return op


def tenant_objects(fleet: FleetUnderTest) -> dict[str, tuple[set[str], set[str]]]:
    return {r: (fleet.databases(r), fleet.roles(r)) for r in fleet.regions()}


def assert_provisioned_once(
    platform: Platform, fleet: FleetUnderTest, owner: Owner, tid: uuid.UUID, region: str
) -> None:
    """The project's database and exactly its three roles exist on `region`'s
    server and nowhere else; its credentials connect; nothing else exists."""
    name = tenant_db_name(tid)
    objects = tenant_objects(fleet)
    for r, (dbs, roles) in objects.items():
        if r == region:
            assert dbs == {name}, (r, dbs)
            assert roles == {name, f"{name}_rw", f"{name}_ro"}, (r, roles)
        else:
            assert dbs == set() and roles == set(), (r, dbs, roles)
    with fleet.admin_conn(region) as c:
        owner_name = c.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        assert owner_name == (f"{name}_rw",)
        members = c.execute(
            "SELECT count(*) FROM pg_auth_members WHERE roleid = %s::regrole", (name,)
        ).fetchone()
        assert members == (2,)
    project = service.get_project(platform, owner, tid)
    assert project.status == "active"
    for mode in ("rw", "ro"):
        uri = service.connection_details(platform, owner, tid, mode).uri
        res = run_psql(uri, "select current_user")
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == f"{name}_{mode}"


def assert_nothing_left(fleet: FleetUnderTest) -> None:
    for r, (dbs, roles) in tenant_objects(fleet).items():
        assert dbs == set() and roles == set(), (r, dbs, roles)


# ---------------------------------------------------------------- provision

PROVISION_POINTS = [
    "provision.place.before",
    "provision.place.after",
    "provision.roles.before",
    "provision.roles.after",
    "provision.database.before",
    "provision.database.created",  # inside the step: database made, ACL not yet
    "provision.database.after",
    "provision.privileges.before",
    "provision.privileges.after",
    "provision.activate.before",
    "provision.activate.after",
    "provision.route.before",
    "provision.route.after",
]


@pytest.mark.parametrize("point", PROVISION_POINTS)
def test_provision_survives_sigkill(
    point: str,
    quiet_platform: Platform,
    workers: Workers,
    someone: Owner,
    fleet: FleetUnderTest,
) -> None:
    project, op_id = service.start_create_project(
        quiet_platform, someone, name="crash", region="eu-central-1", plan_type="free"
    )
    first = workers.start(point)
    workers.reached(point)
    workers.kill(first)
    workers.start()
    op = wait_op(quiet_platform, op_id, workers)
    assert op.status == "finished", (op, workers.logs())
    assert op.attempts == 2
    assert [s.name for s in op.steps] == [
        "place",
        "roles",
        "database",
        "privileges",
        "activate",
        "route",
    ]
    assert all(s.status == "finished" for s in op.steps)
    assert_provisioned_once(quiet_platform, fleet, someone, project.id, "eu-central-1")


CLAIM_POINTS = [
    "provision.roles.before",
    "provision.roles.claimed",  # inside the step: the spare is the project's, unrecorded
    "provision.roles.after",
    # The database and privileges steps are skipped after a claim, recorded
    # with the activate step's start: killed before it, or after it.
    "provision.activate.before",
    "provision.activate.after",
]


@pytest.mark.parametrize("point", CLAIM_POINTS)
def test_provision_from_a_prepared_spare_survives_sigkill(
    point: str,
    quiet_platform: Platform,
    workers: Workers,
    someone: Owner,
    fleet: FleetUnderTest,
) -> None:
    server = next(s for s in quiet_platform.servers.all() if s.region == "eu-central-1")
    refill_spares(quiet_platform, server, 1)
    project, op_id = service.start_create_project(
        quiet_platform, someone, name="crash", region="eu-central-1", plan_type="free"
    )
    first = workers.start(point)
    workers.reached(point)
    workers.kill(first)
    workers.start()
    op = wait_op(quiet_platform, op_id, workers)
    assert op.status == "finished", (op, workers.logs())
    assert op.attempts == 2
    # Killed after the claim committed but before the roles step was recorded
    # (`claimed`, `roles.after`), the retry finds the project's roles and
    # converges them the slow way; killed later, the retry skips what the
    # claim already did.
    claimed = CLAIMED in (op.result or {}).get("actions", [])
    assert claimed == (point not in ("provision.roles.claimed", "provision.roles.after")), op
    then = "skipped" if claimed else "finished"
    assert [(s.name, s.status) for s in op.steps] == [
        ("place", "finished"),
        ("roles", "finished"),
        ("database", then),
        ("privileges", then),
        ("activate", "finished"),
        ("route", then),
    ], op.steps
    assert_provisioned_once(quiet_platform, fleet, someone, project.id, "eu-central-1")


class _Died(BaseException):
    """An executor's sudden end, in process (as a SIGKILL at a failpoint)."""


def _pro_create_died_at_route(
    quiet_platform: Platform, someone: Owner, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, uuid.UUID]:
    """A pro create from a spare (its route is not a spare's: the route step
    runs) whose executor died as the route step started, past the point of
    no return: (project, operation id)."""
    from pgfleet.operations import runner

    server = next(s for s in quiet_platform.servers.all() if s.region == "eu-central-1")
    refill_spares(quiet_platform, server, 1)
    project, op_id = service.start_create_project(
        quiet_platform, someone, name="late", region="eu-central-1", plan_type="pro"
    )

    def died(name: str, **_: Any) -> None:
        if name == "provision.route.before":
            raise _Died

    with monkeypatch.context() as m:
        m.setattr(runner, "failpoint", died)
        with pytest.raises(_Died):
            execute_operation(quiet_platform, op_id, worker="first")
    return project, op_id


def test_a_skip_that_cannot_decide_runs_its_step(
    quiet_platform: Platform, someone: Owner, fleet: FleetUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an attack: a resumed create asked whether to skip its route
    with a read of the platform DB, outside the retries; a blip there failed
    the operation past its point of no return, and its undo dropped the
    active project's database. A skip now reads only the state, and one
    that fails runs the step (which looks before it acts)."""
    from pgfleet.tenants import routing

    project, op_id = _pro_create_died_at_route(quiet_platform, someone, monkeypatch)
    blips: list[int] = []
    fits = routing.spare_route_fits

    def blip(plan: str | None) -> bool:
        if not blips:
            blips.append(1)
            raise psycopg.OperationalError("simulated: the platform DB went away")
        return fits(plan)

    monkeypatch.setattr(routing, "spare_route_fits", blip)
    assert execute_operation(quiet_platform, op_id, worker="second") == "finished"
    assert blips == [1]
    assert service.get_project(quiet_platform, someone, project.id).status == "active"
    assert tenant_db_name(project.id) in fleet.databases("eu-central-1")


@pytest.mark.parametrize("for_good", [True, False])
def test_a_create_whose_route_fails_after_activate_finishes_or_undoes_nothing(
    for_good: bool,
    quiet_platform: Platform,
    someone: Owner,
    fleet: FleetUnderTest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past `activate` the project is its caller's. A route that fails for
    good is kept in the result for the routers' sync to mend, and the create
    finishes (its caller gets the credentials); anything else failing there
    fails the operation, but nothing is undone: the project stays active
    with its database (the undo once dropped it)."""
    from pgfleet.errors import Conflict
    from pgfleet.operations.store import get_operation
    from pgfleet.tenants import routing

    project, op_id = _pro_create_died_at_route(quiet_platform, someone, monkeypatch)
    failure = Conflict("simulated: routers refused") if for_good else RuntimeError("a bug")

    def refused(*_: Any, **__: Any) -> Any:
        raise failure

    monkeypatch.setattr(routing, "publish", refused)
    ended = execute_operation(quiet_platform, op_id, worker="second")
    assert ended == ("finished" if for_good else "failed")
    assert service.get_project(quiet_platform, someone, project.id).status == "active"
    assert tenant_db_name(project.id) in fleet.databases("eu-central-1")
    if for_good:
        with quiet_platform.db.connection() as conn:
            result = get_operation(conn, op_id).result or {}
        assert "routers refused" in result["route_error"], result


# ---------------------------------------------------------------- delete

DELETE_POINTS = [
    "delete.block.after",
    "delete.route.after",
    "delete.drop_database.before",
    "delete.drop_database.after",
    "delete.drop_roles.mid",  # inside the step: one role dropped
    "delete.drop_roles.after",
    "delete.finish.before",
]


@pytest.mark.parametrize("point", DELETE_POINTS)
def test_delete_survives_sigkill(
    point: str,
    quiet_platform: Platform,
    workers: Workers,
    someone: Owner,
    fleet: FleetUnderTest,
) -> None:
    steady = workers.start()
    project, op_id = service.start_create_project(
        quiet_platform, someone, name="doomed", region="ap-southeast-1", plan_type="free"
    )
    assert wait_op(quiet_platform, op_id, workers).status == "finished"
    uri = service.connection_details(quiet_platform, someone, project.id).uri
    workers.kill(steady)

    op_id = service.start_delete_project(quiet_platform, someone, project.id)
    first = workers.start(point)
    workers.reached(point)
    workers.kill(first)
    workers.start()
    op = wait_op(quiet_platform, op_id, workers)
    assert op.status == "finished", (op, workers.logs())
    assert op.attempts == 2
    row = service.get_project(quiet_platform, someone, project.id, include_deleted=True)
    assert row.status == "deleted"
    assert row.deleted_at is not None
    assert_nothing_left(fleet)
    assert run_psql(uri, "select 1").returncode != 0


# ---------------------------------------------------------------- rotate

ROTATE_POINTS = [
    "rotate_password.generate.after",
    "rotate_password.apply.before",
    "rotate_password.apply.after",
    "rotate_password.store.before",
    "rotate_password.route.before",
]


@pytest.mark.parametrize("point", ROTATE_POINTS)
def test_rotate_survives_sigkill(
    point: str,
    quiet_platform: Platform,
    workers: Workers,
    someone: Owner,
    fleet: FleetUnderTest,
) -> None:
    steady = workers.start()
    project, op_id = service.start_create_project(
        quiet_platform, someone, name="keys", region="us-east-1", plan_type="free"
    )
    assert wait_op(quiet_platform, op_id, workers).status == "finished"
    tid = project.id
    old = {m: service.connection_details(quiet_platform, someone, tid, m).uri for m in ("rw", "ro")}
    workers.kill(steady)

    op_id = service.rotate_password(quiet_platform, someone, tid)
    first = workers.start(point)
    workers.reached(point)
    workers.kill(first)
    workers.start()
    op = wait_op(quiet_platform, op_id, workers)
    assert op.status == "finished", (op, workers.logs())
    for mode in ("rw", "ro"):
        new = service.connection_details(quiet_platform, someone, tid, mode).uri
        assert new != old[mode]
        assert run_psql(new, "select 1").returncode == 0
        res = run_psql(old[mode], "select 1")
        assert refused(res.stderr), res.stderr
    assert_provisioned_once(quiet_platform, fleet, someone, tid, "us-east-1")


# ---------------------------------------------------------------- races and faults


def test_two_workers_racing_run_an_operation_once(
    quiet_platform: Platform, someone: Owner, fleet: FleetUnderTest
) -> None:
    """Two executors handed the same operation at once: one runs it, the other
    finds it taken; every step ran exactly once."""
    project, op_id = service.start_create_project(
        quiet_platform, someone, name="race", region="eu-central-1", plan_type="free"
    )
    results: list[str] = []
    barrier = threading.Barrier(2)

    def go(name: str) -> None:
        barrier.wait()
        results.append(execute_operation(quiet_platform, op_id, worker=name))

    threads = [threading.Thread(target=go, args=(f"racer-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) in (["busy", "finished"], ["finished", "finished"]), results
    with quiet_platform.db.connection() as conn:
        op = conn.execute(
            "SELECT status, attempts FROM operations WHERE id = %s", (op_id,)
        ).fetchone()
        steps = conn.execute(
            "SELECT name, attempts FROM operation_steps WHERE operation_id = %s ORDER BY position",
            (op_id,),
        ).fetchall()
    assert op == ("finished", 1)
    assert all(a == 1 for _, a in steps), steps
    assert_provisioned_once(quiet_platform, fleet, someone, project.id, "eu-central-1")


def test_two_worker_processes_share_the_queue(
    quiet_platform: Platform, workers: Workers, someone: Owner, fleet: FleetUnderTest
) -> None:
    """Operations on different projects run in parallel across workers; each
    runs once."""
    workers.start()
    workers.start()
    # Both are up and listening before the work arrives.
    end = time.monotonic() + 60
    while True:
        with quiet_platform.db.connection() as conn:
            live = conn.execute(
                "SELECT count(*) FROM procrastinate_workers "
                "WHERE last_heartbeat > now() - interval '5 seconds'"
            ).fetchone()
        if live and live[0] >= 2:
            break
        assert time.monotonic() < end, workers.logs()
        time.sleep(0.1)
    started = [
        service.start_create_project(
            quiet_platform, someone, name=f"p{i}", region="us-east-1", plan_type="free"
        )
        for i in range(6)
    ]
    ops = [wait_op(quiet_platform, op_id, workers) for _, op_id in started]
    assert [o.status for o in ops] == ["finished"] * 6, (
        [o.error for o in ops],
        workers.logs()[-3000:],
    )
    assert all(o.attempts == 1 for o in ops)
    assert len({o.worker for o in ops}) == 2, "both workers should have taken some"
    assert len(fleet.databases("us-east-1")) == 6


def test_platform_connection_killed_mid_step_resumes(
    quiet_platform: Platform, workers: Workers, someone: Owner, fleet: FleetUnderTest
) -> None:
    point = "provision.database.created"
    workers.start(point)
    project, op_id = service.start_create_project(
        quiet_platform, someone, name="flaky", region="eu-central-1", plan_type="free"
    )
    workers.reached(point)
    with fleet.admin_conn(None) as c:
        # The worker's platform connections (its operation lock among them).
        killed = c.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = 'pgfleet' AND pid <> pg_backend_pid()",
            (quiet_platform.conninfo["dbname"],),
        ).fetchone()
    assert killed is not None and killed[0] >= 1
    workers.release(point)
    op = wait_op(quiet_platform, op_id, workers)
    assert op.status == "finished", (op, workers.logs())
    # Its locks died with the connection: that executor stopped at the next
    # step instead of carrying on unlocked, and the operation was resumed.
    assert "lost its locks" in workers.logs()
    assert_provisioned_once(quiet_platform, fleet, someone, project.id, "eu-central-1")


def test_region_down_retries_then_fails_after_deadline(
    platform_factory: Any, fleet: FleetUnderTest, held: Any
) -> None:
    from pgfleet.auth import create_owner
    from pgfleet.tenants.reconcile import reconcile

    p: Platform = platform_factory(operation_deadline_s=4.0)
    owner = create_owner(p, "unlucky")[0]
    server = fleet.server("eu-central-1")
    reached, release = held("provision.place.after")
    project, op_id = service.start_create_project(
        p, owner, name="late", region="eu-central-1", plan_type="free"
    )
    reached()
    fleet.fleet.stop(server)
    try:
        release()
        op = OperationsRuntime.of(p).wait(op_id, 30)
    finally:
        fleet.fleet.start(server)
    assert op.status == "failed", op
    assert "eu-central-1" in op.error
    assert "deadline" in op.error
    assert op.deadline_missed is True
    failed_step = [s for s in op.steps if s.status == "failed"]
    assert [s.name for s in failed_step] == ["roles"], op.steps
    assert failed_step[0].attempts >= 2, op.steps
    row = service.get_project(p, owner, project.id, include_deleted=True)
    # Undoing needed the server too: the project is left `failed` for the reconciler.
    assert row.status == "failed"
    report = reconcile(p, repair=True)
    assert any(f["kind"] == "failed_project" for f in report["findings"]), report
    service.delete_project(p, owner, project.id)
    assert_nothing_left(fleet)


def test_region_back_in_time_succeeds(
    platform_factory: Any, fleet: FleetUnderTest, held: Any
) -> None:
    from pgfleet.auth import create_owner

    p: Platform = platform_factory(operation_deadline_s=30.0)
    owner = create_owner(p, "patient")[0]
    server = fleet.server("ap-southeast-1")
    reached, release = held("provision.place.after")
    project, op_id = service.start_create_project(
        p, owner, name="soon", region="ap-southeast-1", plan_type="free"
    )
    reached()
    fleet.fleet.stop(server)
    release()
    time.sleep(1.5)
    fleet.fleet.start(server)
    op = OperationsRuntime.of(p).wait(op_id, 30)
    assert op.status == "finished", op
    # The roles step waited for the server (retrying its connection) and went on.
    roles = next(s for s in op.steps if s.name == "roles")
    assert roles.duration_ms >= 1000, op.steps
    assert_provisioned_once(p, fleet, owner, project.id, "ap-southeast-1")


def test_killed_worker_is_noticed_without_any_other_activity(
    quiet_platform: Platform, workers: Workers, someone: Owner
) -> None:
    """The dead worker's job goes back to the queue by heartbeat alone."""
    point = "provision.roles.after"
    first = workers.start(point)
    _, op_id = service.start_create_project(
        quiet_platform, someone, name="orphaned", region="us-east-1", plan_type="free"
    )
    workers.reached(point)
    workers.kill(first)
    with quiet_platform.db.connection() as conn:
        job = conn.execute(
            "SELECT j.status FROM procrastinate_jobs j JOIN operations o ON o.job_id = j.id "
            "WHERE o.id = %s",
            (op_id,),
        ).fetchone()
    assert job == ("doing",)
    workers.start()
    assert wait_op(quiet_platform, op_id, workers).status == "finished"


def test_past_the_point_of_no_return_an_operation_only_goes_forward(
    platform_factory: Any, fleet: FleetUnderTest, held: Any
) -> None:
    """A delete whose drop has started, with its server down past the
    deadline: it is not undone (the database may be gone) but keeps trying,
    marked as late, and finishes when the server is back."""
    from pgfleet.auth import create_owner

    p: Platform = platform_factory(operation_deadline_s=2.0)
    owner = create_owner(p, "halfway")[0]
    project, _ = service.create_project(
        p, owner, name="gone-ish", region="eu-central-1", plan_type="free"
    )
    reached, release = held("delete.drop_database.before")
    op_id = service.start_delete_project(p, owner, project.id)
    reached()
    server = fleet.server("eu-central-1")
    fleet.fleet.stop(server)
    try:
        release()
        time.sleep(4.0)
        op = OperationsRuntime.of(p).wait(op_id, 0.1)
        assert op.status == "running", op
        assert op.deadline_missed is True
        assert service.get_project(p, owner, project.id, include_deleted=True).status == "deleting"
    finally:
        fleet.fleet.start(server)
    op = OperationsRuntime.of(p).wait(op_id, 60)
    assert op.status == "finished", op
    assert service.get_project(p, owner, project.id, include_deleted=True).status == "deleted"
    assert_nothing_left(fleet)


def test_rotation_interrupted_in_apply_goes_forward(
    platform_factory: Any, fleet: FleetUnderTest, held: Any
) -> None:
    from pgfleet.auth import create_owner

    p: Platform = platform_factory(operation_deadline_s=2.0)
    owner = create_owner(p, "keys")[0]
    project, _ = service.create_project(
        p, owner, name="rot", region="ap-southeast-1", plan_type="free"
    )
    tid = project.id
    old = service.connection_details(p, owner, tid, "rw").uri
    reached, release = held("rotate_password.apply.before")
    op_id = service.rotate_password(p, owner, tid)
    reached()
    server = fleet.server("ap-southeast-1")
    fleet.fleet.stop(server)
    try:
        release()
        time.sleep(3.0)
        # Cancelling is refused: the new password may be on the server already.
        from pgfleet.errors import Conflict
        from pgfleet.operations.service import cancel_operation

        with pytest.raises(Conflict, match="point of no return"):
            cancel_operation(p, owner, str(op_id))
    finally:
        fleet.fleet.start(server)
    op = OperationsRuntime.of(p).wait(op_id, 60)
    assert op.status == "finished", op
    assert op.deadline_missed is True
    for mode in ("rw", "ro"):
        uri = service.connection_details(p, owner, tid, mode).uri
        assert run_psql(uri, "select 1").returncode == 0, mode
    assert refused(run_psql(old, "select 1").stderr)


# ---------------------------------------------------------------- inline


@pytest.mark.parametrize("point", ["provision.roles.claimed", "provision.activate.before"])
def test_a_create_the_api_ran_itself_survives_the_api_killed_mid_way(
    point: str,
    quiet_platform: Platform,
    workers: Workers,
    fleet: FleetUnderTest,
    tmp_path: Path,
) -> None:
    """An API process with embedded workers runs the operations it starts
    itself (no queue). Killed mid-way, it leaves the operation to the
    workers' recovery loop, like a dead worker: the create finishes once,
    from where it stopped."""
    from pgfleet.auth import create_owner

    owner, token = create_owner(quiet_platform, "inline")
    server = next(s for s in quiet_platform.servers.all() if s.region == "eu-central-1")
    refill_spares(quiet_platform, server, 1)
    port = free_port_block(1)
    env = workers.env(point)
    env.update(
        PGFLEET_API_PORT=str(port),
        PGFLEET_API_WORKERS="1",
        PGFLEET_EMBEDDED_WORKERS="1",
        PGFLEET_BACKGROUND_TASKS="false",
    )
    with (tmp_path / "worker-api.log").open("wb") as log:
        api = subprocess.Popen(
            [sys.executable, "-m", "pgfleet.cli", "serve"], env=env, stdout=log, stderr=log
        )
    workers.procs.append(api)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/health", timeout=1)
            break
        except httpx.HTTPError:
            assert time.monotonic() < end and api.poll() is None, workers.logs()
            time.sleep(0.1)
    r = httpx.post(
        f"{url}/v1/projects?wait=false",
        json={"name": "inline", "region": "eu-central-1", "plan_type": "free"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert r.status_code == 202, r.text
    op_id = uuid.UUID(r.json()["operation"]["id"])
    project_id = uuid.UUID(r.json()["id"])
    workers.reached(point)
    with quiet_platform.db.connection() as conn:
        row = conn.execute(
            "SELECT worker, job_id FROM operations WHERE id = %s", (op_id,)
        ).fetchone()
    assert row is not None and str(row[0]).endswith("-inline"), row  # run by the API itself
    assert row[1] is None  # never queued
    workers.kill(api)
    workers.start()
    op = wait_op(quiet_platform, op_id, workers)
    assert op.status == "finished", (op, workers.logs())
    assert op.attempts == 2
    assert not str(op.worker).endswith("-inline")  # a worker finished it
    assert_provisioned_once(quiet_platform, fleet, owner, project_id, "eu-central-1")


def _filled_project(platform: Platform, owner: Owner, region: str, rows: int = 3000) -> Any:
    from pgfleet.tenants.connections import DatabasePlatformClient

    project, _ = service.create_project(
        platform, owner, name="backed", region=region, plan_type="free"
    )
    ep = DatabasePlatformClient.of(platform).endpoint(project.id)
    import psycopg

    with psycopg.connect(**ep.conninfo("rw", 5), autocommit=True) as c:
        c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        c.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, %s) g", (rows,))
    return project


SNAPSHOT_POINTS = ["snapshot.dump.before", "snapshot.dump.written", "snapshot.prune.before"]


@pytest.mark.parametrize("point", SNAPSHOT_POINTS)
def test_snapshot_survives_sigkill(
    point: str, quiet_platform: Platform, workers: Workers, someone: Owner
) -> None:
    from pgfleet.backups import service as backups
    from pgfleet.errors import Conflict

    inline = quiet_platform
    first = workers.start(point)
    project = _filled_project(inline, someone, "us-east-1")
    sid, op_id = backups.start_snapshot(inline, someone, project.id)
    workers.reached(point)
    workers.kill(first)
    # Killed mid-way: listed as running, never usable.
    listed = backups.list_backups(inline, someone, project.id).snapshots
    assert [(s.id, s.status) for s in listed] in ([(sid, "running")], [(sid, "ok")])
    if listed[0].status == "running":
        with pytest.raises(Conflict):
            backups.start_restore(inline, someone, project.id, backup_id=str(sid))
    workers.start()
    op = wait_op(inline, op_id, workers)
    assert op.status == "finished", (op, workers.logs())
    snap = backups.get_snapshot(inline, someone, project.id, sid)
    assert snap.status == "ok" and snap.tables and snap.tables["public.t"]["rows"] == 3000
    path = Path(snap.path)
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() == snap.sha256
    assert not list(path.parent.glob("*.partial"))


RESTORE_POINTS = [
    "restore.fetch.restored",
    "restore.fetch.after",
    "restore.load.loaded",
    "restore.verify.after",
]


@pytest.mark.parametrize("point", RESTORE_POINTS)
def test_point_in_time_restore_survives_sigkill(
    point: str, quiet_platform: Platform, workers: Workers, someone: Owner, fleet: FleetUnderTest
) -> None:
    import psycopg

    from pgfleet.backups import archives
    from pgfleet.backups import service as backups
    from pgfleet.tenants.connections import DatabasePlatformClient

    p = quiet_platform
    first = workers.start(point)
    project = _filled_project(p, someone, "eu-central-1")
    archives.take_base_backup(p, fleet.server("eu-central-1").name, "full")
    time.sleep(1.1)
    new, op_id = backups.start_restore(p, someone, project.id, region="us-east-1")
    workers.reached(point)
    workers.kill(first)
    workers.start()
    op = wait_op(p, op_id, workers, timeout=120)
    assert op.status == "finished", (op, workers.logs())
    ep = DatabasePlatformClient.of(p).endpoint(new.id)
    with psycopg.connect(**ep.conninfo("rw", 5)) as c:
        assert c.execute("SELECT count(*) FROM t").fetchone() == (3000,)
    assert tenant_db_name(new.id) in fleet.databases("us-east-1")
    scratch = fleet.settings.home_abs / "scratch"
    assert not scratch.exists() or not any(scratch.iterdir())


IN_PLACE_POINTS = [
    "restore_in_place.safety_snapshot.after",
    "restore_in_place.verify.after",
    "restore_in_place.swap.renamed",  # the project's database aside, the copy not in place
    "restore_in_place.clean.before",
]


@pytest.mark.parametrize("point", IN_PLACE_POINTS)
def test_restore_over_the_project_survives_sigkill(
    point: str, quiet_platform: Platform, workers: Workers, someone: Owner, fleet: FleetUnderTest
) -> None:
    import psycopg

    from pgfleet.backups import service as backups
    from pgfleet.tenants.connections import DatabasePlatformClient

    p = quiet_platform
    first = workers.start(point)
    project = _filled_project(p, someone, "us-east-1")
    sid, op_id = backups.start_snapshot(p, someone, project.id)
    wait_op(p, op_id, workers)
    ep = DatabasePlatformClient.of(p).endpoint(project.id)
    with psycopg.connect(**ep.conninfo("rw", 5), autocommit=True) as c:
        c.execute("DELETE FROM t WHERE id > 10")
    _, op_id = backups.start_restore(p, someone, project.id, backup_id=str(sid), into="same")
    workers.reached(point)
    workers.kill(first)
    workers.start()
    op = wait_op(p, op_id, workers, timeout=120)
    assert op.status == "finished", (op, workers.logs())
    with psycopg.connect(**ep.conninfo("rw", 5)) as c:
        assert c.execute("SELECT count(*) FROM t").fetchone() == (3000,)
    with fleet.admin_conn("us-east-1") as c:
        left = c.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'pgfleet\\_re%%' "
            "UNION ALL SELECT rolname FROM pg_roles WHERE rolname LIKE 'pgfleet\\_re%%'"
        ).fetchall()
    assert left == []
