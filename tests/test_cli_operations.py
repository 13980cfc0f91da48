"""The CLI's operations commands against a real API server: projects
rotate-password/pause/resume/plan/audit with and without --wait, ops
list/show/watch/cancel, audit and reconcile."""

from __future__ import annotations

import re
import time

import pytest

from pgfleet.platform.owners import Owner
from tests.helpers import FleetUnderTest, refused, run_psql
from tests.test_cli import URI_RE, UUID_RE, Cli

pytestmark = pytest.mark.usefixtures("cli_env")


@pytest.fixture
def cli(api_url: str, owner: tuple[Owner, str]) -> Cli:
    return Cli(api_url, owner[1])


@pytest.fixture
def admin_cli(api_url: str, admin: tuple[Owner, str]) -> Cli:
    return Cli(api_url, admin[1])


def make(cli: Cli, name: str = "shop", region: str = "eu-central-1") -> str:
    data = cli.json("projects", "create", "--name", name, "--region", region)
    pid: str = data["id"]
    return pid


def test_lifecycle_commands(cli: Cli, fleet: FleetUnderTest) -> None:
    pid = make(cli)
    old = cli.ok("projects", "connection", pid).strip()

    assert "--yes" in cli.fails("projects", "rotate-password", pid)  # nobody to ask: refused
    out = cli.ok("projects", "rotate-password", pid, "--yes")
    assert re.search(r"operation \S+ \(rotate_password\) is finished", out), out
    new = URI_RE.search(out)
    assert new is not None, out
    assert run_psql(new.group(0), "select 1").returncode == 0
    assert refused(run_psql(old, "select 1").stderr)
    # Only the read-only role: its new string is printed, not the unchanged
    # read-write one.
    old_ro = cli.ok("projects", "connection", pid, "--mode", "ro").strip()
    out = cli.ok("projects", "rotate-password", pid, "--role", "ro", "--yes")
    assert "read-only connection: " in out and new.group(0) not in out, out
    new_ro = URI_RE.search(out.split("read-only connection: ")[1])
    assert new_ro is not None and new_ro.group(0) != old_ro, out
    assert run_psql(new_ro.group(0), "select 1").returncode == 0
    assert refused(run_psql(old_ro, "select 1").stderr)
    assert run_psql(new.group(0), "select 1").returncode == 0

    out = cli.ok("projects", "pause", pid)
    assert f"project {pid} is paused" in out
    assert refused(run_psql(new.group(0), "select 1").stderr, "not permitted to log in")
    assert "paused" in cli.fails("projects", "pause", pid)
    out = cli.ok("projects", "resume", pid)
    assert f"project {pid} is active" in out
    assert run_psql(new.group(0), "select 1").returncode == 0

    out = cli.ok("projects", "plan", pid, "pro")
    assert "(change_plan) is finished" in out
    assert "placement: no move needed" in out
    assert "unknown plan" in cli.fails("projects", "plan", pid, "gold")

    out = cli.ok("projects", "audit", pid)
    for action in ("project.create", "project.rotate_password", "project.pause"):
        assert action in out, out

    listed = cli.ok("ops", "list", "--project", pid)
    for kind in ("provision", "rotate_password", "pause", "resume", "change_plan"):
        assert kind in listed, listed
    op_id = UUID_RE.search(listed.split("change_plan")[0].splitlines()[-1])
    assert op_id is not None, listed
    shown = cli.ok("ops", "show", op_id.group(0))
    assert "change_plan" in shown and "finished" in shown
    assert cli.ok("ops", "show", op_id.group(0)[:8]) == shown  # a prefix names it too
    assert "limits" in shown and "record" in shown  # the steps table

    out = cli.ok("projects", "delete", pid, "--yes")
    assert f"project {pid} is deleted" in out
    assert "(delete) is finished" in out
    assert fleet.databases("eu-central-1") == set()


def test_no_wait_then_watch(cli: Cli) -> None:
    out = cli.ok("projects", "create", "--name", "later", "--region", "ap-southeast-1", "--no-wait")
    m = re.search(r"operation (\S+) \(provision\)", out)
    assert m is not None, out
    assert f"pgfleet ops watch {m.group(1)}" in out or "is finished" in out
    watched = cli.ok("ops", "watch", m.group(1))
    assert "finished" in watched
    for step in ("place", "roles", "database", "privileges", "activate", "route"):
        assert step in watched, watched
    data = cli.json("ops", "show", m.group(1))
    assert data["status"] == "finished"
    assert [s["name"] for s in data["steps"]][-1] == "route"


def test_cancel_a_finished_operation_fails_clearly(cli: Cli) -> None:
    pid = make(cli, "done")
    op = cli.json("ops", "list", "--project", pid)["operations"][0]
    msg = cli.fails("ops", "cancel", op["id"])
    assert "already finished" in msg and "409" in msg
    assert "not found" in cli.fails("ops", "show", "00000000-0000-0000-0000-000000000000")


def test_audit_and_reconcile_for_admins(cli: Cli, admin_cli: Cli, fleet: FleetUnderTest) -> None:
    make(cli, "audited")
    out = admin_cli.ok("audit")
    assert "project.create" in out and "alice" in out
    assert "403" in cli.fails("audit")
    out = admin_cli.ok("reconcile")
    assert "no differences" in out
    with fleet.admin_conn("us-east-1") as c:
        c.execute("CREATE DATABASE tenant_00000000_0000_0000_0000_0000000000aa")
    out = admin_cli.ok("reconcile")
    assert "orphan_database" in out and "--repair" in out
    out = admin_cli.ok("reconcile", "--repair")
    assert "dropped" in out
    assert "tenant_00000000_0000_0000_0000_0000000000aa" not in fleet.databases("us-east-1")
    assert "--force only makes sense with --repair" in admin_cli.fails("reconcile", "--force")


def test_connection_strings_pooled_and_direct(cli: Cli, fleet: FleetUnderTest) -> None:
    """`projects connection`: the router (session, transaction), `--direct`
    the server, each connecting; the note goes to stderr."""
    pid = make(cli, "strings")
    routers = fleet.fleet.routers
    session = cli(*("projects", "connection", pid))
    assert session.exit_code == 0, session.output
    assert f":{routers.spec('eu-central-1', 'session').port}/" in session.stdout
    tx = cli("projects", "connection", pid, "--pooling", "transaction")
    assert f":{routers.spec('eu-central-1', 'transaction').port}/" in tx.stdout
    assert "transaction pooling" in tx.stderr
    direct = cli("projects", "connection", pid, "--direct")
    assert f":{fleet.server('eu-central-1').port}/" in direct.stdout
    assert "pg_dump" in direct.stderr
    for res in (session, tx, direct):
        uri = URI_RE.search(res.stdout)
        assert uri, res.stdout
        assert run_psql(uri.group(0), "select 1").stdout.strip() == "1"
    bad = cli("projects", "connection", pid, "--pooling", "statement")
    assert bad.exit_code != 0 and "'session' or 'transaction'" in bad.output


def test_backups_commands(cli: Cli, admin_cli: Cli, fleet: FleetUnderTest) -> None:
    pid = make(cli, "books", region="us-east-1")
    uri = cli.ok("projects", "connection", pid, "--direct").strip()
    assert run_psql(uri, "create table b (x int); insert into b values (1), (2)").returncode == 0
    out = cli.ok("backups", "create", pid)
    assert re.search(r"backup \S+: .* 1 tables, 2 rows, stored in us-west-1", out), out
    out = cli.ok("backups", "list", pid)
    assert "stored in: us-west-1" in out and "ok" in out, out
    snap = re.search(UUID_RE, out)
    assert snap is not None, out
    # base backups are an admin's; an owner is told so
    assert "admin" in cli.fails("backups", "base", fleet.server("us-east-1").name)
    out = admin_cli.ok("backups", "base", fleet.server("us-east-1").name, "--type", "full")
    assert re.search(r"full backup \S+F of us-east-1-a", out), out
    time.sleep(1.1)  # the restorable window opens the second after the backup
    out = admin_cli.ok("backups", "servers")
    assert "us-east-1-a" in out and "us-west-1" in out, out
    out = cli.ok("backups", "restore", pid, "--backup", snap.group(0), "--region", "eu-central-1")
    assert "restored into project" in out and "in eu-central-1" in out, out
    assert "1 tables, 2 rows checked" in out, out
    new = URI_RE.search(out)
    assert new is not None, out
    assert run_psql(new.group(0), "select count(*) from b").stdout.strip() == "2"
    said = cli.fails("backups", "restore", pid, "--at", "2001-01-01T00:00:00Z")
    assert "outside the restorable window" in said and "UTC" in said, said
    # An error about an option names the option typed, not the API's field.
    said = cli.fails("backups", "restore", pid, "--at", "yesterday")
    assert said.startswith("error: --at: ") and "target_time" not in said, said
    said = cli.fails("ops", "list", "--status", "runing")
    assert said.startswith("error: --status: ") and "query." not in said, said
    said = cli.fails("projects", "rotate-password", pid, "--overlap", "-5", "--yes")
    assert said.startswith("error: --overlap must be between"), said
    assert "residency" in cli.fails(
        "projects", "create", "--name", "x", "--region", "us-east-1", "--residency", "eu"
    )
    # Over the project itself: refused without --yes when nobody can be asked.
    assert run_psql(uri, "delete from b").returncode == 0
    assert "--yes" in cli.fails(
        "backups", "restore", pid, "--backup", snap.group(0), "--into", "same"
    )
    out = cli.ok("backups", "restore", pid, "--backup", snap.group(0), "--into", "same", "--yes")
    assert f"restored project {pid} over itself" in out and "kept as snapshot" in out, out
    assert run_psql(uri, "select count(*) from b").stdout.strip() == "2"
