"""The platform DB goes away under a running API (its postmaster SIGKILLed)
and comes back: every route answers 503 `platform_unavailable` quickly
meanwhile, everything (API, workers, listeners) recovers by itself within
seconds, the logs say so once per change, and the API stops promptly on
SIGTERM or `pgfleet down` whatever the database is doing.

Real processes on a fleet of their own: `pgfleet up --detach` in a fresh
home, the platform server's postmaster killed and restarted with pg_ctl."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pgfleet.config import Settings
from pgfleet.fleet.embedded import EmbeddedFleet
from tests.helpers import free_port_block, wait_healthy

OUTAGE_S = 20  # long enough for psycopg's reconnection backoff to reach 16 s


class CliFleet:
    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="pgfleet-outage-"))
        os.chmod(self.home, 0o755)
        base = free_port_block(60)
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PGFLEET_", "POSTGRES_HOST_", "PG"))
        }
        self.env.update(
            PGFLEET_HOME=str(self.home),
            PGFLEET_PORT_BASE=str(base),
            PGFLEET_API_PORT=str(base + 55),
            PGFLEET_FSYNC="false",
            PGFLEET_BACKUP_SCHEDULE="false",
            PGFLEET_EMBEDDED_REGIONS="us-east-1",
            PGFLEET_API_WORKERS="1",
            PGFLEET_HEALTH_INTERVAL_S="1",
            COLUMNS="200",
        )
        self.url = f"http://127.0.0.1:{base + 55}"
        self.settings = Settings(
            home=self.home, port_base=base, fsync=False, embedded_regions=["us-east-1"]
        )
        self.fleet = EmbeddedFleet(self.settings)

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pgfleet.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @property
    def token(self) -> str:
        return (self.home / "admin-token").read_text().strip()

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )

    def kill_platform(self) -> None:
        """SIGKILL the platform server's postmaster (its backends follow)."""
        pidfile = self.fleet.data_dir("platform") / "postmaster.pid"
        pid = int(pidfile.read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 10
        while self.fleet.is_running(self.fleet.platform_server()):
            assert time.monotonic() < end, "the platform server did not die"
            time.sleep(0.1)
        time.sleep(0.5)  # its backends notice and exit

    def start_platform(self) -> None:
        self.fleet.start(self.fleet.platform_server())

    def api_log(self) -> str:
        log = self.home / "api.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def close(self) -> None:
        self.run("down", timeout=120)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
def cli_fleet() -> Iterator[CliFleet]:
    f = CliFleet()
    try:
        r = f.run("up", "--detach")
        assert r.returncode == 0, r.stderr + r.stdout
        yield f
    finally:
        if not f.fleet.is_running(f.fleet.platform_server()):
            f.start_platform()
        f.close()


def console_session(f: CliFleet) -> httpx.Client:
    c = httpx.Client(
        base_url=f.url, timeout=30, follow_redirects=False, headers={"Accept": "text/html"}
    )
    page = c.get("/signin")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf, page.text
    r = c.post("/signin", data={"token": f.token, "next": "/projects", "csrf": csrf.group(1)})
    assert r.status_code == 303, r.text
    assert c.get("/projects").status_code == 200
    return c


def timed(fn: Any) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = fn()
    return r, time.monotonic() - t0


def test_routes_fail_fast_while_the_platform_db_is_away_and_recover_by_themselves(
    cli_fleet: CliFleet,
) -> None:
    f = cli_fleet
    api = f.client()
    console = console_session(f)
    try:
        _outage_and_recovery(f, api, console)
    finally:
        api.close()
        console.close()


def _outage_and_recovery(f: CliFleet, api: httpx.Client, console: httpx.Client) -> None:
    assert api.get("/v1/me").status_code == 200
    first = api.post("/v1/projects", json={"name": "before", "region": "us-east-1"})
    assert first.status_code == 201, first.text

    f.kill_platform()
    killed_at = time.monotonic()
    calls = {
        "GET /v1/me": lambda: api.get("/v1/me"),
        "GET /v1/projects": lambda: api.get("/v1/projects"),
        "GET /v1/regions": lambda: api.get("/v1/regions"),
        "POST /v1/projects": lambda: api.post(
            "/v1/projects", json={"name": "during", "region": "us-east-1"}
        ),
        "POST sql": lambda: api.post(
            f"/v1/projects/{first.json()['id']}/sql", json={"query": "select 1"}
        ),
    }
    slowest = 0.0
    while time.monotonic() - killed_at < OUTAGE_S:
        for what, call in calls.items():
            r, took = timed(call)
            assert r.status_code == 503, f"{what}: {r.status_code} {r.text}"
            assert r.json()["error"]["code"] == "platform_unavailable", f"{what}: {r.text}"
            slowest = max(slowest, took)
        page, took = timed(lambda: console.get("/projects"))
        assert page.status_code == 503 and "text/html" in page.headers["content-type"]
        assert "platform database" in page.text
        health = api.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "down"
        time.sleep(0.5)
    # The first call may wait out one pool timeout (3 s) to learn it; none more.
    assert slowest < 4.0, slowest
    r, took = timed(lambda: api.get("/v1/me"))
    assert r.status_code == 503 and took < 0.5, took

    f.start_platform()
    back_at = time.monotonic()
    while True:
        me = api.get("/v1/me")
        if me.status_code == 200:
            break
        assert time.monotonic() - back_at < 5, me.text
        time.sleep(0.1)
    # The API runs the creates it starts itself.
    created = api.post("/v1/projects", json={"name": "after", "region": "us-east-1"})
    assert created.status_code == 201, created.text
    assert time.monotonic() - back_at < 15
    assert console.get("/projects").status_code == 200
    sql = api.post(f"/v1/projects/{first.json()['id']}/sql", json={"query": "select 1"})
    assert sql.status_code == 200, sql.text
    # The embedded worker comes back by itself too (it retries with backoff).
    while (health := api.get("/health").json())["status"] != "ok":
        assert time.monotonic() - back_at < 20, health
        time.sleep(0.2)
    assert health["operations"]["workers"] >= 1
    status = f.run("status")
    assert "1 live worker" in status.stdout, status.stdout

    # Said once per change of state, not once per attempt. (The operations
    # listener starts only once a wait needs it: creates this API ran itself
    # need none.)
    log = f.api_log()
    for line in ("platform DB unreachable", "worker"):
        assert line in log, f"nothing about {line!r} in the log:\n{log[-3000:]}"
    assert log.count("operations listener lost its connection") <= 2, log[-3000:]
    assert log.count("auth cache off") <= 2, log[-3000:]
    assert log.count("is not running") <= 2, log[-3000:]
    assert log.count("Traceback") == 0, log[-3000:]


def stop_detached_api(f: CliFleet) -> None:
    pid = int(json.loads((f.home / "api.pid").read_text())["pid"])
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and _state(pid) != "Z":
        assert time.monotonic() < end, "the detached API did not stop"
        time.sleep(0.1)


def test_health_is_degraded_when_no_worker_is_alive(cli_fleet: CliFleet) -> None:
    f = cli_fleet
    stop_detached_api(f)
    env = {**f.env, "PGFLEET_EMBEDDED_WORKERS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgfleet.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(f.url, 30)
        end = time.monotonic() + 30
        while True:  # the previous API's worker heartbeat fades
            body = httpx.get(f"{f.url}/health", timeout=10).json()
            if not body["operations"]["workers"]:
                break
            assert time.monotonic() < end, body
            time.sleep(0.5)
        assert body["status"] == "degraded"
        assert any("no operations worker is alive" in r for r in body["reasons"]), body
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_sigterm_stops_the_api_promptly_even_with_the_platform_db_away(
    cli_fleet: CliFleet,
) -> None:
    f = cli_fleet
    with f.client() as api:
        created = api.post("/v1/projects", json={"name": "x", "region": "us-east-1"})
        assert created.status_code == 201
        pid = int(json.loads((f.home / "api.pid").read_text())["pid"])
        f.kill_platform()
        assert api.get("/v1/me").status_code == 503
    os.kill(pid, signal.SIGTERM)
    t0 = time.monotonic()
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        assert time.monotonic() - t0 < 8, "the API did not stop within 8 s of SIGTERM"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "X"
    return stat[stat.rindex(")") + 2]


def test_down_stops_an_api_running_in_the_foreground(cli_fleet: CliFleet) -> None:
    f = cli_fleet
    stop_detached_api(f)
    foreground = subprocess.Popen(
        [sys.executable, "-m", "pgfleet.cli", "serve"],
        env=f.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(f.url, 30, alive=lambda: None if foreground.poll() is None else "exited")
        down = f.run("down")
        assert down.returncode == 0, down.stderr
        assert "stopped API" in down.stdout, down.stdout
        assert foreground.wait(timeout=20) is not None
    finally:
        if foreground.poll() is None:
            foreground.kill()


def test_up_detach_starts_the_api_when_the_recorded_one_is_dead(cli_fleet: CliFleet) -> None:
    f = cli_fleet
    pid = int(json.loads((f.home / "api.pid").read_text())["pid"])
    os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and _state(pid) != "Z":
        assert time.monotonic() < end
        time.sleep(0.1)
    again = f.run("up", "--detach")
    assert again.returncode == 0, again.stderr
    assert "already running" not in again.stdout
    wait_healthy(f.url, 30)
    with f.client() as api:
        assert api.get("/v1/me").status_code == 200


def test_up_detach_refuses_a_port_someone_else_holds(cli_fleet: CliFleet) -> None:
    """Workers a killed API supervisor left behind (or any program) hold the
    port: `up --detach` says so and fails, instead of reporting an API that
    is not its own."""
    import socket

    f = cli_fleet
    stop_detached_api(f)
    port = int(f.url.rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        again = f.run("up", "--detach")
        assert again.returncode != 0, again.stdout
        assert f"port {port} is in use by pid {os.getpid()}" in again.stderr + again.stdout
