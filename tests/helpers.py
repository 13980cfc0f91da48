"""Helpers the test files share (fixtures stay in conftest.py): the fleet
under test, an API client bound to a token, psql, and the API calls most
tests make."""

from __future__ import annotations

import itertools
import math
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import uvicorn
from fastapi.testclient import TestClient
from psycopg import sql
from typer.testing import CliRunner, Result

from pgfleet.api.app import create_app, proxy_options
from pgfleet.cli import app as cli_app
from pgfleet.config import Settings
from pgfleet.fleet.embedded import EmbeddedFleet, EmbeddedServer
from pgfleet.platform.core import Platform
from pgfleet.tenants.connections import DatabasePlatformClient


def free_port_block(n: int) -> int:
    """A base port with n consecutive free ports after it, below the
    kernel's ephemeral range (32768-60999 on Linux): a port in that range,
    freed by a server the test stopped or killed, can be taken at any moment
    as the local port of an outgoing connection (a router's to another
    server, say), and the server then cannot start on it again."""
    start = 20000 + (os.getpid() * 97) % 10000
    for base in itertools.chain(range(start, 32700 - n, 61), range(20000, start, 61)):
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block")


def make_settings(home: Path, port_base: int, **overrides: Any) -> Settings:
    # Tests make requests faster than any person; the rate-limit tests set
    # their own limits.
    limits = {
        "rate_limit_per_s": 100_000,
        "rate_limit_sql_per_s": 100_000,
        "rate_limit_auth_failures_per_min": 100_000,
        # Base backups and snapshots only when a test asks for them.
        "backup_schedule": False,
        # Prepared spares too: they are named like the projects they will
        # be, and a refill in the background would race the tests that
        # count a server's projects or the routers' databases.
        "spare_databases": 0,
    }
    return Settings(
        home=home,
        port_base=port_base,
        fsync=False,
        api_port=port_base + 50,
        **{**limits, **overrides},
    )


class FleetUnderTest:
    """The suite's embedded fleet, with helpers to look at its servers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.fleet = EmbeddedFleet(settings)

    def server(self, region: str) -> EmbeddedServer:
        return next(s for s in self.fleet.regional_servers() if s.region == region)

    def admin_conn(self, region: str | None, dbname: str = "postgres") -> psycopg.Connection[Any]:
        srv = self.fleet.platform_server() if region is None else self.server(region)
        return psycopg.connect(**self.fleet.conninfo(srv, dbname), autocommit=True)

    def databases(self, region: str) -> set[str]:
        with self.admin_conn(region) as c:
            return {
                r[0]
                for r in c.execute(
                    "SELECT datname FROM pg_database WHERE datname LIKE 'tenant\\_%'"
                )
            }

    def roles(self, region: str) -> set[str]:
        with self.admin_conn(region) as c:
            return {
                r[0]
                for r in c.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'tenant\\_%'")
            }

    def regions(self) -> list[str]:
        return [s.region for s in self.fleet.regional_servers() if s.region]

    def wipe_tenants(self) -> None:
        for region in self.regions():
            if not self.fleet.is_running(self.server(region)):
                self.fleet.start(self.server(region))
            with self.admin_conn(region) as c:
                for db in self.databases(region):
                    # A test that failed midway may leave one marked a template.
                    c.execute(
                        sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(sql.Identifier(db))
                    )
                    c.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(db)
                        )
                    )
                for role in self.roles(region):
                    c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        # The routers forget them too (the next test's platform DB has none).
        routers = self.fleet.routers
        routers.write([], [])
        for spec in routers.specs:
            if not routers.state(spec).running:
                self.fleet.start_routers()
            routers.reload(spec)


class Api:
    """A TestClient bound to one token."""

    def __init__(self, client: TestClient, token: str) -> None:
        self.client = client
        self.token = token

    def __getattr__(self, method: str) -> Any:
        def call(path: str, **kw: Any) -> Any:
            headers = {"Authorization": f"Bearer {self.token}", **kw.pop("headers", {})}
            return getattr(self.client, method)(path, headers=headers, **kw)

        return call


def psql_path() -> str:
    from pgfleet.fleet.binaries import find_binaries

    candidate = find_binaries().bindir / "psql"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("psql")
    assert found, "psql is needed by the tests"
    return found


def run_psql(uri: str, query: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(
        [psql_path(), uri, "-XAtqc", query], capture_output=True, text=True, env=env, timeout=30
    )


def wait_healthy(url: str, seconds: float, alive: Callable[[], str | None] | None = None) -> None:
    """Until `url`/health answers 200; `alive` says why the server is gone, if it is."""
    deadline = time.monotonic() + seconds
    while True:
        if alive is not None and (why := alive()) is not None:
            raise AssertionError(why)
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the API at {url} did not start"
        time.sleep(0.05)


# How a router (PgBouncer) refuses a login: a wrong password or an unknown
# role, the same SCRAM failure for all; or a database it does not route to
# those credentials (a project it no longer routes, another project's), which
# its HBA matches to no line, before any password.
ROUTER_REFUSED = "SASL authentication failed"
ROUTER_NO_ENTRY = "no authentication method is found"
ROUTER_REFUSALS = (ROUTER_REFUSED, ROUTER_NO_ENTRY)


def refused(message: str, server_reason: str = "password authentication failed") -> bool:
    """A login was refused, by the server (`server_reason`) or by a router."""
    return server_reason in message or any(r in message for r in ROUTER_REFUSALS)


def create(api: Api, name: str = "shop", **kw: Any) -> Any:
    params = kw.pop("params", None)
    headers = kw.pop("headers", {})
    return api.post("/v1/projects", json={"name": name, **kw}, params=params, headers=headers)


def create_ok(api: Api, name: str = "shop", **kw: Any) -> dict[str, Any]:
    r = create(api, name, **kw)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def error_of(r: Any, status: int | None = None) -> dict[str, Any]:
    """The error of an answer (that must have `status`, when given) in the one
    envelope."""
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert err["code"] and err["message"], err
    return err


def poll(api: Api, op_id: str, timeout: float = 30) -> dict[str, Any]:
    """The operation once it ended."""
    end = time.monotonic() + timeout
    while True:
        op: dict[str, Any] = api.get(f"/v1/operations/{op_id}").json()
        if op["status"] in ("finished", "failed", "cancelled"):
            return op
        assert time.monotonic() < end, op
        time.sleep(0.05)


def finished(api: Api, r: Any) -> dict[str, Any]:
    """The operation a 200/201/202 answer started, once it finished."""
    assert r.status_code in (200, 201, 202), r.text
    body = r.json()
    op_id = body["operation"]["id"] if "operation" in body else body["id"]
    op = poll(api, op_id)
    assert op["status"] == "finished", op
    return op


def connect(connection: dict[str, Any], **kw: Any) -> psycopg.Connection[Any]:
    """A session with the credentials an API answer handed out."""
    return psycopg.connect(connection["uri"], autocommit=True, connect_timeout=5, **kw)


def tenant_client(platform: Platform) -> DatabasePlatformClient:
    """The seed's DatabasePlatformClient of a platform."""
    return DatabasePlatformClient.of(platform)


def run(api: Api, pid: str, query: str, *params: Any, **kw: Any) -> httpx.Response:
    body: dict[str, Any] = {"query": query, **kw}
    if params:
        body["params"] = list(params)
    r: httpx.Response = api.post(f"/v1/projects/{pid}/sql", json=body)
    return r


def run_ok(api: Api, pid: str, query: str, *params: Any, **kw: Any) -> dict[str, Any]:
    r = run(api, pid, query, *params, **kw)
    assert r.status_code == 200, (query, r.status_code, r.text)
    body: dict[str, Any] = r.json()
    return body


def sql_error(r: httpx.Response) -> dict[str, Any]:
    err = error_of(r, 400)
    assert err["code"] == "sql_error", err
    return err


def scalar(api: Api, pid: str, query: str, *params: Any, **kw: Any) -> Any:
    body = run_ok(api, pid, query, *params, **kw)
    assert len(body["rows"]) == 1 and len(body["rows"][0]) == 1, body
    return body["rows"][0][0]


def until(check: Any, seconds: float = 2.0) -> Any:
    """Poll `check` until it returns something truthy (a change notice is
    asynchronous: it arrives just after the commit)."""
    end = time.monotonic() + seconds
    while True:
        result = check()
        if result or time.monotonic() > end:
            return result
        time.sleep(0.01)


def percentile_cont(values: Sequence[float], q: float) -> float:
    """PostgreSQL's percentile_cont: linear interpolation between ranks."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def rows_of(platform: Platform, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with platform.db.connection() as conn:
        return conn.execute(query, params).fetchall()


def sql_ok(api: Api, pid: str, query: str, **kw: Any) -> dict[str, Any]:
    r = api.post(f"/v1/projects/{pid}/sql", json={"query": query, **kw})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def get_ok(api: Api, path: str, **params: Any) -> Any:
    r = api.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def invoke(url: str, token: str, *args: str) -> Result:
    return CliRunner().invoke(
        cli_app, [*args, "--url", url, "--token", token], env={"COLUMNS": "250"}
    )


def ok(url: str, token: str, *args: str) -> str:
    res = invoke(url, token, *args)
    assert res.exit_code == 0, (args, res.output, res.exception)
    return res.stdout


def login(uri: str) -> str:
    res = run_psql(uri, "select 1")
    return "ok" if res.returncode == 0 else res.stderr


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


MISSING_ID = "00000000-0000-4000-8000-000000000000"


def restart(fleet: FleetUnderTest, server: EmbeddedServer) -> None:
    """Start a server this test stopped, so later tests have the whole fleet."""
    fleet.fleet.start(server)
    assert fleet.fleet.is_running(server)


@contextmanager
def serve(platform: Platform) -> Iterator[str]:
    """A real uvicorn server for `platform` on a free port, in a thread, with
    the options `pgfleet up` gives it; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(platform),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        **proxy_options(platform.settings),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 20)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def children_of(parent: int) -> list[int]:
    """The pids of `parent`'s child processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
    return found


def postmaster_pid(fleet: FleetUnderTest, region: str) -> int:
    """The pid of the region's embedded server."""
    data = fleet.fleet.data_dir(fleet.server(region).name)
    return int((data / "postmaster.pid").read_text().split()[0])
