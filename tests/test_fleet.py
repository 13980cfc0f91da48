"""The embedded fleet: how its servers are set up, restarts keep data, and
the newcomer's `pgfleet up` / `status` / `down` flow as real processes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from pgfleet.tenants.service import create_project
from tests.helpers import FleetUnderTest, free_port_block, run_psql, tenant_client


def processes_under(home: Path) -> list[int]:
    """Processes whose command line names a path under `home`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(home).encode() in cmdline:
            found.append(int(pid))
    return found


def test_servers_listen_on_loopback_with_scram_and_logical_wal(fleet: FleetUnderTest) -> None:
    for region in [None, *fleet.regions()]:
        with fleet.admin_conn(region) as c:
            settings = dict(
                c.execute(
                    "SELECT name, setting FROM pg_settings WHERE name IN ('listen_addresses', "
                    "'wal_level', 'password_encryption', 'unix_socket_directories')"
                ).fetchall()
            )
            hba = c.execute(
                "SELECT type, database, user_name, auth_method FROM pg_hba_file_rules"
            ).fetchall()
        # A socket on the regional servers, in the server's private directory.
        sockets = "" if region is None else str(fleet.fleet.socket_dir(fleet.server(region).name))
        assert settings == {
            "listen_addresses": "127.0.0.1",
            "wal_level": "logical",
            "password_encryption": "scram-sha-256",
            "unix_socket_directories": sockets,
        }
        methods = {r[3] for r in hba}
        assert methods <= {"scram-sha-256", "reject", "peer"}
        # Only pgBackRest's way in is peer: the admin, on the private socket,
        # into the admin database.
        assert {(r[0], tuple(r[1]), tuple(r[2])) for r in hba if r[3] == "peer"} == (
            set() if region is None else {("local", ("postgres",), ("pgfleet_admin",))}
        )
        # Every rule that admits anyone over the network needs TLS; the only
        # others are the private socket's: the routers' (project roles into
        # their own database) and pgBackRest's.
        admits = {(r[0], tuple(r[1]), tuple(r[2])) for r in hba if r[3] != "reject"}
        assert {a[0] for a in admits if a[0] != "local"} == {"hostssl"}
        local = {a for a in admits if a[0] == "local"}
        assert local == (
            set()
            if region is None
            else {
                ("local", ("samerole",), ("all",)),
                ("local", ("postgres",), ("pgfleet_admin",)),
            }
        )
        if region is None:  # the platform server: nobody but the admin
            assert {r[2][0] for r in hba if r[3] != "reject"} == {"pgfleet_admin"}
        else:  # regional: the admin in `postgres` and `template1` only, tenants by samerole
            assert ("hostssl", ["samerole"], ["all"], "scram-sha-256") in hba
            admin = [r[1] for r in hba if r[2] == ["pgfleet_admin"] and r[3] != "reject"]
            assert admin == [["postgres"], ["postgres", "template1"], ["replication"]]


def test_secrets_are_private_and_servers_run_unprivileged(fleet: FleetUnderTest) -> None:
    home = fleet.settings.home_abs
    for f in (home / "secrets").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    for srv in fleet.fleet.servers():
        data = fleet.fleet.data_dir(srv.name)
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        if os.geteuid() == 0:
            assert data.stat().st_uid != 0  # initdb refuses root: an unprivileged user owns it
    passwords = {fleet.fleet.admin_password(s.name) for s in fleet.fleet.servers()}
    assert len(passwords) == len(fleet.fleet.servers())  # one password per server


def test_up_again_reuses_and_restart_keeps_data(
    fleet: FleetUnderTest, platform: Platform, owner: tuple[Owner, str]
) -> None:
    project, db = create_project(
        platform, owner[0], name="keep", region="ap-southeast-1", plan_type="free"
    )
    with tenant_client(platform).get_tenant_connection(project.id) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('still here')")
        conn.commit()
    with fleet.admin_conn("ap-southeast-1") as c:
        ident = c.execute("SELECT system_identifier FROM pg_control_system()").fetchone()

    fleet.fleet.up()  # running again: reuses what exists
    fleet.fleet.down()
    assert not any(st.running for st in fleet.fleet.states())
    fleet.fleet.up()

    with fleet.admin_conn("ap-southeast-1") as c:
        assert c.execute("SELECT system_identifier FROM pg_control_system()").fetchone() == ident
    res = run_psql(
        f"postgresql://{db.user}:{db.password}@{db.host}:{db.port}/{db.database}",
        "SELECT v FROM kept",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "still here"
    # The platform's pools recover on their own after the restart.
    with tenant_client(platform).get_tenant_connection(project.id, "ro") as conn:
        assert conn.execute("SELECT v FROM kept").fetchone() == ("still here",)


@pytest.fixture
def cli_env() -> Iterator[dict[str, str]]:
    home = Path(tempfile.mkdtemp(prefix="pgfleet-cli-"))
    os.chmod(home, 0o755)
    base = free_port_block(60)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PGFLEET_", "POSTGRES_HOST_", "PG"))
    }
    env.update(
        PGFLEET_HOME=str(home),
        PGFLEET_PORT_BASE=str(base),
        PGFLEET_API_PORT=str(base + 55),
        PGFLEET_FSYNC="false",
        PGFLEET_BACKUP_SCHEDULE="false",
        PGFLEET_EMBEDDED_REGIONS="us-east-1,eu-central-1",
        COLUMNS="200",
    )
    yield env
    subprocess.run(
        [sys.executable, "-m", "pgfleet.cli", "down"], env=env, capture_output=True, timeout=120
    )
    shutil.rmtree(home, ignore_errors=True)


def pgfleet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgfleet.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_cli_up_status_down_up_keeps_everything(cli_env: dict[str, str]) -> None:
    home = Path(cli_env["PGFLEET_HOME"])
    r = pgfleet(cli_env, "up", "--detach")
    assert r.returncode == 0, r.stderr + r.stdout
    token = (home / "admin-token").read_text().strip()
    assert token.startswith("pgf_") and token in r.stdout
    assert stat.S_IMODE((home / "admin-token").stat().st_mode) == 0o600

    st = pgfleet(cli_env, "status")
    assert st.returncode == 0, st.stderr
    for name in ("platform", "us-east-1-a", "eu-central-1-a"):
        assert name in st.stdout
    for router in ("us-east-1-session", "us-east-1-transaction", "eu-central-1-session"):
        assert router in st.stdout, st.stdout
    assert st.stdout.count("\tup\t") >= 3, st.stdout

    created = pgfleet(
        cli_env, "projects", "create", "--name", "shop", "--region", "eu-central-1", "--json"
    )
    assert created.returncode == 0, created.stderr
    project = json.loads(created.stdout)
    uri = project["connection"]["uri"]
    assert run_psql(uri, "CREATE TABLE t AS SELECT 42 AS answer").returncode == 0

    down = pgfleet(cli_env, "down")
    assert down.returncode == 0, down.stderr
    assert "stopped router us-east-1-session" in down.stdout, down.stdout
    st = pgfleet(cli_env, "status")
    assert "\tup\t" not in st.stdout and st.stdout.count("down") >= 3, st.stdout
    assert run_psql(uri, "SELECT 1").returncode != 0
    assert not processes_under(home), "a router outlived pgfleet down"

    again = pgfleet(cli_env, "up", "--detach")
    assert again.returncode == 0, again.stderr
    assert (home / "admin-token").read_text().strip() == token  # reused, not replaced
    shown = pgfleet(cli_env, "projects", "show", project["id"], "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "active"
    res = run_psql(uri, "SELECT answer FROM t")
    assert res.returncode == 0 and res.stdout.strip() == "42", res.stderr
