"""Backups with real servers and real pgBackRest: snapshots taken as the
project's own role, point-in-time restores from the archive into another
region, restores of snapshots, undelete, residency, damage and bad input."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgfleet.platform.core import Platform
from pgfleet.tenants.naming import tenant_db_name
from tests.helpers import Api, FleetUnderTest, create_ok, error_of

PLANTED_ROWS = 2000


def direct(api: Api, pid: str) -> dict[str, Any]:
    r = api.get(f"/v1/projects/{pid}/connection", params={"direct": "true"})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def connect(c: dict[str, Any]) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=c["host"],
        port=c["port"],
        dbname=c["database"],
        user=c["user"],
        password=c["password"],
        sslmode=c["sslmode"],
        sslrootcert=c["sslrootcert"],
        connect_timeout=5,
        autocommit=True,
    )


def fill(api: Api, pid: str, rows: int = PLANTED_ROWS) -> None:
    with connect(direct(api, pid)) as c:
        c.execute("CREATE TABLE items (id int PRIMARY KEY, doc jsonb, note text)")
        c.execute(
            "INSERT INTO items SELECT g, jsonb_build_object('g', g), repeat('x', g %% 50) "
            "FROM generate_series(1, %s) g",
            (rows,),
        )
        c.execute("CREATE SCHEMA extra")
        c.execute("CREATE TABLE extra.events (at timestamptz DEFAULT now(), what text)")
        c.execute("INSERT INTO extra.events (what) VALUES ('created'), ('filled')")


def count(api: Api, pid: str, table: str = "items") -> int:
    with connect(direct(api, pid)) as c:
        row = c.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
    assert row is not None
    return int(row[0])


def base_backup(admin_api: Api, region: str, fleet: FleetUnderTest) -> None:
    r = admin_api.post(
        "/v1/admin/base-backups", json={"server": fleet.server(region).name, "type": "full"}
    )
    assert r.status_code == 201, r.text


def snapshot(api: Api, pid: str) -> dict[str, Any]:
    r = api.post(f"/v1/projects/{pid}/backups")
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()["backup"]
    return body


def test_a_snapshot_is_taken_as_the_project_role_into_the_paired_region(
    api: Api, fleet: FleetUnderTest, platform: Platform
) -> None:
    p = create_ok(api, "snap", region="us-east-1")
    fill(api, p["id"], rows=50_000)
    rw_user = direct(api, p["id"])["user"]
    seen: set[tuple[str, str]] = set()
    stop = threading.Event()

    def watch() -> None:
        with fleet.admin_conn("us-east-1") as c:
            while not stop.is_set():
                for user, app in c.execute(
                    "SELECT usename, application_name FROM pg_stat_activity WHERE datname = %s",
                    (p["connection"]["database"],),
                ):
                    seen.add((user, app))
                time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        snap = snapshot(api, p["id"])
    finally:
        stop.set()
        watcher.join()
    assert snap["status"] == "ok"
    assert snap["source_region"] == "us-east-1"
    assert snap["storage_region"] == "us-west-1"
    assert snap["tables"] == 2 and snap["rows"] == 50_002
    # pg_dump itself was in the database, as the project's role and nobody else.
    assert ("pgfleet-backup" in {a for _, a in seen}) or ("pg_dump" in {a for _, a in seen})
    assert {u for u, _ in seen} == {rw_user}, seen
    # The file is where the storage region keeps it, and its checksum holds.
    files = list((fleet.settings.home_abs / "backups" / "us-west-1" / "snapshots").rglob("*.dump"))
    mine = [f for f in files if f.stem == snap["id"]]
    assert len(mine) == 1
    import hashlib

    assert hashlib.sha256(mine[0].read_bytes()).hexdigest() == snap["sha256"]
    assert mine[0].stat().st_size == snap["size_bytes"]
    listed = api.get(f"/v1/projects/{p['id']}/backups").json()
    assert [b["id"] for b in listed["backups"]] == [snap["id"]]
    assert listed["storage_region"] == "us-west-1"


def test_a_snapshot_restores_into_a_new_project_in_another_region(
    api: Api, fleet: FleetUnderTest
) -> None:
    p = create_ok(api, "shop", region="us-east-1")
    fill(api, p["id"])
    snap = snapshot(api, p["id"])
    with connect(direct(api, p["id"])) as c:
        c.execute("DELETE FROM items WHERE id > 10")  # the mistake a restore undoes
    r = api.post(
        f"/v1/projects/{p['id']}/restore",
        json={"backup_id": snap["id"], "region": "eu-central-1", "name": "shop again"},
    )
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["hosted_region"] == "eu-central-1"
    assert new["restored_from"]["backup_id"] == snap["id"]
    assert new["connection"]["database"] in fleet.databases("eu-central-1")
    assert count(api, new["id"]) == PLANTED_ROWS
    assert count(api, new["id"], "extra.events") == 2
    assert count(api, p["id"]) == 10  # the original is never written to
    # The restored project's own roles own what came back, its ro role reads.
    with connect(direct(api, new["id"])) as c:
        owners = {
            r[0] for r in c.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'items'")
        }
        assert owners == {new["connection"]["user"]}
    verified = new["operation"]["result"]
    assert verified["verified_rows"] == PLANTED_ROWS + 2


def test_point_in_time_restore_into_another_region(
    api: Api, admin_api: Api, fleet: FleetUnderTest
) -> None:
    p = create_ok(api, "pitr", region="us-east-1")
    fill(api, p["id"])
    base_backup(admin_api, "us-east-1", fleet)
    time.sleep(1.1)  # the window opens the second after the backup stopped
    with connect(direct(api, p["id"])) as c:
        c.execute(
            "INSERT INTO items SELECT g, NULL, 'later' FROM generate_series(100001, 100500) g"
        )
        time.sleep(0.05)
        row = c.execute("SELECT now()").fetchone()
        assert row is not None
        target: datetime = row[0]
        time.sleep(0.05)
        c.execute("DROP TABLE items")  # the accident
    listed = api.get(f"/v1/projects/{p['id']}/backups").json()
    window = listed["restorable_window"]
    assert window is not None, listed
    assert datetime.fromisoformat(window["earliest"]) <= target
    r = api.post(
        f"/v1/projects/{p['id']}/restore",
        json={"target_time": target.isoformat(), "region": "ap-southeast-1"},
    )
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["hosted_region"] == "ap-southeast-1"
    assert count(api, new["id"]) == PLANTED_ROWS + 500
    assert new["operation"]["result"]["files_restored"] == f"only {p['connection']['database']}"
    assert new["connection"]["database"] in fleet.databases("ap-southeast-1")
    # Its credentials are its own: the original's do not open it.
    orig = direct(api, p["id"])
    with pytest.raises(psycopg.OperationalError):
        connect({**direct(api, new["id"]), "user": orig["user"], "password": orig["password"]})
    # No scratch instance is left behind.
    scratch = fleet.settings.home_abs / "scratch"
    assert not scratch.exists() or not any(scratch.iterdir())


def test_a_deleted_project_is_restorable(api: Api, admin_api: Api, fleet: FleetUnderTest) -> None:
    p = create_ok(api, "gone", region="eu-central-1")
    base_backup(admin_api, "eu-central-1", fleet)
    time.sleep(1.1)
    fill(api, p["id"])
    assert api.delete(f"/v1/projects/{p['id']}").status_code == 200
    listed = api.get(f"/v1/projects/{p['id']}/backups").json()
    assert listed["restorable_window"] is not None, listed
    r = api.post(f"/v1/projects/{p['id']}/restore", json={})
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["hosted_region"] == "eu-central-1"
    assert count(api, new["id"]) == PLANTED_ROWS


def test_restore_refuses_what_it_cannot_do(
    api: Api, admin_api: Api, fleet: FleetUnderTest, client: Any, platform: Platform
) -> None:
    from pgfleet.auth import create_owner

    p = create_ok(api, "guarded", region="us-east-1")
    base_backup(admin_api, "us-east-1", fleet)
    # The window opens the whole second after the backup's stop (pgBackRest
    # records whole seconds); until then the answer is "nothing is
    # restorable yet", whatever the target.
    time.sleep(1.1)
    # Outside the window: 422 naming it.
    err = error_of(
        api.post(
            f"/v1/projects/{p['id']}/restore",
            json={"target_time": (datetime.now(UTC) - timedelta(days=30)).isoformat()},
        ),
        422,
    )
    assert "restorable window" in err["message"] and err["earliest"]
    # Both a time and a backup; an unknown backup; an unknown field; into=same.
    error_of(
        api.post(
            f"/v1/projects/{p['id']}/restore",
            json={"target_time": datetime.now(UTC).isoformat(), "backup_id": str(uuid.uuid4())},
        ),
        422,
    )
    error_of(
        api.post(f"/v1/projects/{p['id']}/restore", json={"backup_id": str(uuid.uuid4())}), 404
    )
    error_of(api.post(f"/v1/projects/{p['id']}/restore", json={"when": "now"}), 422)
    error_of(api.post(f"/v1/projects/{p['id']}/restore", json={"region": "mars-1"}), 422)
    # Another owner sees nothing of it.
    _, token = create_owner(platform, "mallory")
    other = Api(client, token)
    error_of(other.get(f"/v1/projects/{p['id']}/backups"), 404)
    error_of(other.post(f"/v1/projects/{p['id']}/restore", json={}), 404)
    error_of(other.post(f"/v1/projects/{p['id']}/backups"), 404)
    # Nothing was created by any of it.
    names = [x["name"] for x in api.get("/v1/projects").json()["projects"]]
    assert names == ["guarded"]


@pytest.mark.usefixtures("cli_env")
def test_a_restore_into_a_region_known_down_fails_fast_unless_asked_to_wait(
    api: Api, platform: Platform, fleet: FleetUnderTest, api_url: str, owner: tuple[Any, str]
) -> None:
    """As a create: a region the health checks know to be down is refused at
    once with nothing made, and wait_for_region queues the restore until
    its server is back."""
    from pgfleet.monitoring.background import run_once
    from tests.helpers import poll
    from tests.test_cli import Cli
    from tests.test_sql_errors import server_down

    cli = Cli(api_url, owner[1])
    p = create_ok(api, "travels", region="us-east-1")
    fill(api, p["id"], rows=100)
    snap = snapshot(api, p["id"])
    url = f"/v1/projects/{p['id']}/restore"
    body = {"backup_id": snap["id"], "region": "ap-southeast-1", "name": "arrived"}
    # Over the project itself it always waits for its server: asking is an error.
    err = error_of(api.post(url, json={"into": "same"}, params={"wait_for_region": "true"}), 422)
    assert err["field"] == "wait_for_region" and "into=new" in err["message"], err
    said = cli.fails("backups", "restore", p["id"], "--into", "same", "--yes", "--wait-for-region")
    assert "--wait-for-region is for into=new" in said, said
    # A project that does not exist is that first.
    nowhere = f"/v1/projects/{uuid.uuid4()}/restore"
    error_of(api.post(nowhere, json={"into": "same"}, params={"wait_for_region": "true"}), 404)
    with server_down(fleet, "ap-southeast-1"):
        run_once(platform)  # the health loop's round notices
        t0 = time.monotonic()
        err = error_of(api.post(url, json=body), 503)
        assert time.monotonic() - t0 < 2, "not at once"
        assert "failed its last health check" in err["message"], err
        assert [x["name"] for x in api.get("/v1/projects").json()["projects"]] == ["travels"]
        r = api.post(url, json=body, params={"wait": "false", "wait_for_region": "true"})
        assert r.status_code == 202, r.text
        op_id = r.json()["operation"]["id"]
        time.sleep(1)
        assert api.get(f"/v1/operations/{op_id}").json()["status"] in ("scheduled", "running")
    assert poll(api, op_id, timeout=90)["status"] == "finished"
    new_id = r.json()["id"]
    assert api.get(f"/v1/projects/{new_id}").json()["status"] == "active"
    assert tenant_db_name(uuid.UUID(new_id)) in fleet.databases("ap-southeast-1")
    assert count(api, new_id) == 100


def test_residency_keeps_a_project_in_its_jurisdiction(
    api: Api, admin_api: Api, fleet: FleetUnderTest
) -> None:
    # A metadata-only EU region lands on the EU server, never on us-east-1.
    p = create_ok(api, "gdpr", region="eu-west-1", residency="eu")
    assert p["hosted_region"] == "eu-central-1" and p["residency"] == "eu"
    err = error_of(
        api.post("/v1/projects", json={"name": "x", "region": "us-east-1", "residency": "eu"}), 409
    )
    assert err["code"] == "residency_violation" and "us-east-1" in err["message"]
    error_of(
        api.post("/v1/projects", json={"name": "x", "region": "eu-central-1", "residency": "mars"}),
        422,
    )
    base_backup(admin_api, "eu-central-1", fleet)
    err = error_of(api.post(f"/v1/projects/{p['id']}/restore", json={"region": "us-east-1"}), 409)
    assert err["code"] == "residency_violation"
    assert err["rule"] == "eu" and err["region"] == "us-east-1"
    # Its snapshot stays in the EU (eu-central-1's pair is eu-west-1).
    snap = snapshot(api, p["id"])
    assert snap["storage_region"] == "eu-west-1"


def test_a_damaged_snapshot_is_refused_and_leaves_nothing(api: Api, fleet: FleetUnderTest) -> None:
    p = create_ok(api, "fragile", region="us-east-1")
    fill(api, p["id"])
    snap = snapshot(api, p["id"])
    path = next((fleet.settings.home_abs / "backups").rglob(f"{snap['id']}.dump"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    r = api.post(f"/v1/projects/{p['id']}/restore", json={"backup_id": snap["id"]})
    err = error_of(r, 409)
    assert err["code"] == "backup_unusable" and "damaged" in err["message"], err
    projects = api.get("/v1/projects").json()["projects"]
    assert [x["name"] for x in projects] == ["fragile"]
    assert (
        len(
            fleet.databases("us-east-1") & {f"tenant_{x['id'].replace('-', '_')}" for x in projects}
        )
        == 1
    )


def _switch_wal(fleet: FleetUnderTest, region: str) -> None:
    with fleet.admin_conn(region) as c:
        c.execute("SELECT txid_current()")
        c.execute("SELECT pg_switch_wal()")


def test_unwritable_backup_storage_alarms_and_recovers_by_itself(
    client: Any, fleet: FleetUnderTest
) -> None:
    repo = fleet.settings.home_abs / "backups" / "us-west-1" / "pgbackrest"
    mode = repo.stat().st_mode & 0o777
    repo.chmod(0)
    try:
        _switch_wal(fleet, "us-east-1")
        deadline = time.monotonic() + 30
        while True:
            body = client.get("/health").json()
            srv = body["regions"]["us-east-1"]["servers"][0]
            if srv["archiving"]["failing"]:
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.3)
        assert body["status"] == "degraded"
        assert body["regions"]["us-east-1"]["status"] == "degraded"
        assert any("cannot archive its WAL" in r for r in body["reasons"]), body["reasons"]
        # The server keeps serving meanwhile.
        with fleet.admin_conn("us-east-1") as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
    finally:
        repo.chmod(mode)
    deadline = time.monotonic() + 60
    while True:
        _switch_wal(fleet, "us-east-1")  # wakes the archiver, which retries
        body = client.get("/health").json()
        if not body["regions"]["us-east-1"]["servers"][0]["archiving"]["failing"]:
            break
        assert time.monotonic() < deadline, body
        time.sleep(1)
    assert body["regions"]["us-east-1"]["status"] == "ok", body


def test_the_schedule_takes_base_backups_and_snapshots(
    platform_factory: Any, api: Api, fleet: FleetUnderTest
) -> None:
    from pgfleet.auth import create_owner
    from pgfleet.backups import archives, service
    from pgfleet.tenants import service as tenants

    # A differential backup every ~0.4 s: whatever the shared fleet has, one is due.
    p: Platform = platform_factory(backup_schedule=True, backup_diff_every_h=0.0001)
    owner, _ = create_owner(p, "scheduled")
    project, _ = tenants.create_project(
        p, owner, name="nightly", region="ap-southeast-1", plan_type="pro"
    )
    free, _ = tenants.create_project(
        p, owner, name="no-schedule", region="ap-southeast-1", plan_type="free"
    )
    server = fleet.server("ap-southeast-1").name
    before = len(archives.base_backups(p, server))
    assert server in dict(archives.due_backups(p))
    # This platform's own worker runs the schedule too (it may hold the lock
    # for a round of its own): a round runs until one takes a backup here.
    deadline = time.monotonic() + 90
    while len(after := archives.base_backups(p, server)) == before:
        assert time.monotonic() < deadline, "no base backup was taken"
        archives.scheduled_base_backups(p)
        time.sleep(0.2)
    assert after[-1].type in ("full", "diff")
    assert server not in dict(archives.due_backups(p, now=after[-1].stopped_at))
    # The pro plan snapshots daily, the free plan not at all. This
    # platform's worker may have started the pro one in its own round.
    due = service.due_snapshots(p)
    assert free.id not in due
    if project.id in due:
        # This round starts it, unless the worker's own did in between.
        assert len(service.scheduled_snapshots(p)) <= 1
    deadline = time.monotonic() + 60
    while True:
        snaps = service.list_backups(p, owner, project.id).snapshots
        if snaps and snaps[0].status == "ok":
            break
        assert time.monotonic() < deadline, snaps
        time.sleep(0.2)
    assert snaps[0].reason == "scheduled"
    assert project.id not in service.due_snapshots(p)
    assert service.list_backups(p, owner, free.id).snapshots == []


def test_a_project_made_after_the_last_base_backup_restores_from_the_wal(
    api: Api, admin_api: Api, fleet: FleetUnderTest
) -> None:
    """Its database is not in the base backup's manifest: the whole server
    is recovered in the scratch instance and the one database copied out."""
    base_backup(admin_api, "eu-central-1", fleet)
    time.sleep(1.1)
    p = create_ok(api, "newer", region="eu-central-1")
    fill(api, p["id"])
    r = api.post(f"/v1/projects/{p['id']}/restore", json={"region": "us-east-1"})
    assert r.status_code == 201, r.text
    assert count(api, r.json()["id"]) == PLANTED_ROWS
    # No other project's files were copied into the scratch instance: only
    # the project's own (by oid: made ahead as a prepared spare, it may be
    # older than the backup), or, made after the backup, none but the
    # system databases.
    restored = r.json()["operation"]["result"]["files_restored"]
    assert restored in (f"only {tenant_db_name(p['id'])}",) or restored.startswith("all but "), (
        restored
    )


def test_a_damaged_archive_is_reported_and_the_restore_leaves_nothing(
    api: Api, admin_api: Api, fleet: FleetUnderTest, platform: Platform
) -> None:
    from pgfleet.backups import archives

    p = create_ok(api, "archived", region="ap-southeast-1")
    fill(api, p["id"])
    server = fleet.server("ap-southeast-1").name
    damaged = archives.take_base_backup(platform, server, "full")
    time.sleep(1.1)
    repo = fleet.settings.home_abs / "backups" / "ap-northeast-1" / "pgbackrest"
    control = next((repo / "backup" / server / damaged.label).rglob("pg_control*"))
    data = bytearray(control.read_bytes())
    data[len(data) // 2] ^= 0xFF
    control.write_bytes(bytes(data))
    try:
        r = api.post(f"/v1/projects/{p['id']}/restore", json={})
        err = error_of(r, 409)
        assert err["code"] == "backup_unusable", err
        assert "damaged" in err["message"] and "verify" in err["message"], err
        names = [x["name"] for x in api.get("/v1/projects").json()["projects"]]
        assert names == ["archived"]
        scratch = fleet.settings.home_abs / "scratch"
        assert not scratch.exists() or not any(scratch.iterdir())
    finally:
        # Later restores from this server must not start from the damaged set.
        archives.take_base_backup(platform, server, "full")
        archive = archives.archive_of(platform)
        assert archive is not None
        stanza = archive.stanza(server)
        fleet.fleet._run(archive._cmd(stanza, "expire", f"--set={damaged.label}"))


def test_a_restore_can_be_cancelled_and_leaves_nothing(
    api: Api, fleet: FleetUnderTest, held: Any
) -> None:
    p = create_ok(api, "cancel-me", region="us-east-1")
    fill(api, p["id"])
    snap = snapshot(api, p["id"])
    reached, release = held("restore.load.before")
    r = api.post(
        f"/v1/projects/{p['id']}/restore", json={"backup_id": snap["id"]}, params={"wait": "false"}
    )
    assert r.status_code == 202, r.text
    op_id, new_id = r.json()["operation"]["id"], r.json()["id"]
    reached()
    assert api.post(f"/v1/operations/{op_id}/cancel").status_code in (200, 202)
    release()
    deadline = time.monotonic() + 30
    while (op := api.get(f"/v1/operations/{op_id}").json())["status"] not in (
        "cancelled",
        "finished",
        "failed",
    ):
        assert time.monotonic() < deadline, op
        time.sleep(0.1)
    assert op["status"] == "cancelled", op
    error_of(api.get(f"/v1/projects/{new_id}"), 404)
    assert f"tenant_{new_id.replace('-', '_')}" not in fleet.databases("us-east-1")
    assert count(api, p["id"]) == PLANTED_ROWS


def leftovers(fleet: FleetUnderTest, region: str) -> set[str]:
    with fleet.admin_conn(region) as c:
        dbs = {r[0] for r in c.execute("SELECT datname FROM pg_database")}
        roles = {r[0] for r in c.execute("SELECT rolname FROM pg_roles")}
    return {n for n in dbs | roles if n.startswith(("pgfleet_restore_", "pgfleet_replaced_"))}


def test_restore_over_the_project_itself_after_a_safety_snapshot(
    api: Api, admin_api: Api, fleet: FleetUnderTest
) -> None:
    p = create_ok(api, "in-place", region="us-east-1")
    other = create_ok(api, "neighbour", region="us-east-1")
    fill(api, p["id"])
    fill(api, other["id"], rows=7)
    snap = snapshot(api, p["id"])
    rw = direct(api, p["id"])
    ro = api.get(f"/v1/projects/{p['id']}/connection", params={"mode": "ro", "direct": "true"})
    with connect(rw) as c:
        c.execute("DELETE FROM items WHERE id > 100")
    r = api.post(f"/v1/projects/{p['id']}/restore", json={"backup_id": snap["id"], "into": "same"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["project"]["id"] == p["id"] and body["operation"]["type"] == "restore_in_place"
    # The same credentials see the restored data; the read-only role reads it.
    assert count(api, p["id"]) == PLANTED_ROWS
    with connect(ro.json()) as c:
        assert c.execute("SELECT count(*) FROM items").fetchone() == (PLANTED_ROWS,)
    with connect(rw) as c:
        assert c.execute("SELECT current_user").fetchone() == (rw["user"],)
    # What it replaced was kept as a safety snapshot first.
    listed = api.get(f"/v1/projects/{p['id']}/backups").json()["backups"]
    safety = [b for b in listed if b["reason"] == "safety"]
    assert len(safety) == 1 and safety[0]["status"] == "ok" and safety[0]["rows"] == 100 + 2
    assert leftovers(fleet, "us-east-1") == set()
    assert count(api, other["id"]) == 7
    # Over itself means where it is.
    err = error_of(
        api.post(
            f"/v1/projects/{p['id']}/restore", json={"into": "same", "region": "eu-central-1"}
        ),
        422,
    )
    assert "stays where it is" in err["message"]
    # A point in time, over itself: back to before a mistake.
    base_backup(admin_api, "us-east-1", fleet)
    time.sleep(1.1)
    with connect(rw) as c:
        row = c.execute("SELECT now()").fetchone()
        assert row is not None
        c.execute("TRUNCATE items")
    r = api.post(
        f"/v1/projects/{p['id']}/restore",
        json={"target_time": row[0].isoformat(), "into": "same"},
    )
    assert r.status_code == 200, r.text
    assert count(api, p["id"]) == PLANTED_ROWS
    assert leftovers(fleet, "us-east-1") == set()


def test_backups_leaving_a_ruled_projects_jurisdiction_are_reported(
    platform_factory: Any,
) -> None:
    from fastapi.testclient import TestClient

    from pgfleet.api.app import create_app
    from pgfleet.auth import create_owner
    from pgfleet.tenants import service as tenants

    p: Platform = platform_factory()
    owner, _ = create_owner(p, "ruled")
    tenants.create_project(
        p, owner, name="gdpr", region="eu-central-1", plan_type="free", residency="eu"
    )
    with TestClient(create_app(p)) as c:
        assert not any("residency" in r for r in c.get("/health").json()["reasons"])
    # The operator then sends eu-central-1's backups to the US.
    p.settings = p.settings.model_copy(update={"backup_regions": {"eu-central-1": "us-west-1"}})
    with TestClient(create_app(p)) as c:
        body = c.get("/health").json()
    assert body["regions"]["eu-central-1"]["status"] == "degraded"
    assert any("residency rule 'eu'" in r and "us-west-1" in r for r in body["reasons"]), body


def test_an_owner_runs_at_most_two_copies_at_once(api: Api, held: Any) -> None:
    """Each snapshot or restore holds a worker slot while it copies: one
    owner's (a tenant whose objects make copying slow) cannot take them all."""
    p = create_ok(api, "busy", region="us-east-1")
    fill(api, p["id"], rows=10)
    snap = snapshot(api, p["id"])
    reached, release = held("restore.load.before")
    ops = []
    for _ in range(2):
        r = api.post(
            f"/v1/projects/{p['id']}/restore",
            json={"backup_id": snap["id"]},
            params={"wait": "false"},
        )
        assert r.status_code == 202, r.text
        ops.append(r.json()["operation"]["id"])
    reached()
    err = error_of(api.post(f"/v1/projects/{p['id']}/backups"), 409)
    assert "at most 2 run at once per owner" in err["message"], err
    error_of(api.post(f"/v1/projects/{p['id']}/restore", json={"backup_id": snap["id"]}), 409)
    release()
    for op_id in ops:
        deadline = time.monotonic() + 60
        while api.get(f"/v1/operations/{op_id}").json()["status"] != "finished":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert snapshot(api, p["id"])["status"] == "ok"  # room again


def test_a_tenants_slow_objects_do_not_hold_a_restore_past_its_cancel(api: Api) -> None:
    """A function that sleeps when it runs anywhere but in its own database
    (an index on it is built again by pg_restore): the copy is stopped at
    once when the restore is cancelled, not hours later."""
    p = create_ok(api, "slow", region="us-east-1")
    c = direct(api, p["id"])
    with connect(c) as conn:
        conn.execute("CREATE TABLE slowt (id int); INSERT INTO slowt VALUES (1)")
        conn.execute(
            "CREATE FUNCTION slow(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN "
            f"IF current_database() <> '{c['database']}' THEN PERFORM pg_sleep(600); END IF; "
            "RETURN x; END $$"
        )
        conn.execute("CREATE INDEX ON slowt (slow(id))")
    snap = snapshot(api, p["id"])
    r = api.post(
        f"/v1/projects/{p['id']}/restore", json={"backup_id": snap["id"]}, params={"wait": "false"}
    )
    assert r.status_code == 202, r.text
    op_id, new_id = r.json()["operation"]["id"], r.json()["id"]
    deadline = time.monotonic() + 30
    while api.get(f"/v1/operations/{op_id}").json()["current_step"] != "load":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1)
    started = time.monotonic()
    assert api.post(f"/v1/operations/{op_id}/cancel").status_code in (200, 202)
    while (op := api.get(f"/v1/operations/{op_id}").json())["status"] == "running":
        assert time.monotonic() - started < 20, op
        time.sleep(0.2)
    assert op["status"] == "cancelled", op
    error_of(api.get(f"/v1/projects/{new_id}"), 404)


def test_missing_backup_storage_alarms_and_the_workers_bring_it_back(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    import shutil

    from fastapi.testclient import TestClient

    from pgfleet.api.app import create_app
    from pgfleet.backups import archives

    p: Platform = platform_factory(backup_schedule=True)
    repo = fleet.settings.home_abs / "backups" / "ap-northeast-1" / "pgbackrest"
    shutil.rmtree(repo)
    with TestClient(create_app(p)) as c:
        _switch_wal(fleet, "ap-southeast-1")
        deadline = time.monotonic() + 30
        while not any("ap-southeast-1" in r for r in c.get("/health").json()["reasons"]):
            assert time.monotonic() < deadline
            time.sleep(0.3)
        # The workers' next round: the stanza again, and a full base backup.
        archives.scheduled_base_backups(p)
        server = fleet.server("ap-southeast-1").name
        deadline = time.monotonic() + 60
        while not archives.base_backups(p, server):
            assert time.monotonic() < deadline, "no base backup after the storage came back"
            time.sleep(0.3)
        while True:
            _switch_wal(fleet, "ap-southeast-1")
            body = c.get("/health").json()
            if body["regions"]["ap-southeast-1"]["status"] == "ok":
                break
            assert time.monotonic() < deadline + 30, body
            time.sleep(1)
