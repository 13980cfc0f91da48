"""The test suite starts its own embedded fleet once per run (fsync off) and
gives every test a fresh platform DB made from a migrated template."""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from fastapi.testclient import TestClient
from psycopg import sql

from pgfleet.api.app import create_app
from pgfleet.auth import create_owner
from pgfleet.config import Settings
from pgfleet.fleet.embedded import EmbeddedFleet, EmbeddedServer
from pgfleet.platform import migrate
from pgfleet.platform.core import Platform
from pgfleet.tenants.service import Owner

# The seed's host variables would switch pgfleet to external servers.
for _var in ("POSTGRES_HOST_US_EAST", "POSTGRES_HOST_EU", "POSTGRES_HOST_APAC", "PGFLEET_CONFIG"):
    os.environ.pop(_var, None)

TEMPLATE_DB = "pgfleet_template"
_db_counter = itertools.count()


def _free_port_block(n: int) -> int:
    """A base port with n consecutive free ports after it."""
    start = 41000 + (os.getpid() * 97) % 15000
    for base in itertools.chain(range(start, 60000, 61), range(41000, start, 61)):
        if base <= 54330 and base + n >= 54320:
            continue  # leave pgfleet's default ports to a developer's own fleet
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
                    c.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(db)
                        )
                    )
                for role in self.roles(region):
                    c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture(scope="session")
def fleet() -> Iterator[FleetUnderTest]:
    # Not under pytest's tmp dir: that is 0700, and the servers run as an
    # unprivileged user when the suite runs as root.
    home = Path(tempfile.mkdtemp(prefix="pgfleet-test-"))
    os.chmod(home, 0o755)
    settings = make_settings(home, _free_port_block(60))
    tf = FleetUnderTest(settings)
    tf.fleet.up()
    with tf.admin_conn(None) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(TEMPLATE_DB)))
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
    migrate.upgrade(tf.fleet.conninfo(tf.fleet.platform_server(), TEMPLATE_DB))
    yield tf
    tf.fleet.down()
    shutil.rmtree(home, ignore_errors=True)


def fresh_platform_db(tf: FleetUnderTest) -> dict[str, Any]:
    name = f"pgfleet_test_{os.getpid()}_{next(_db_counter)}"
    with tf.admin_conn(None) as c:
        c.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    return tf.fleet.conninfo(tf.fleet.platform_server(), name)


def drop_platform_db(tf: FleetUnderTest, conninfo: dict[str, Any]) -> None:
    with tf.admin_conn(None) as c:
        c.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(conninfo["dbname"])
            )
        )


@pytest.fixture
def platform_factory(fleet: FleetUnderTest) -> Iterator[Any]:
    """Builds Platforms on fresh platform DBs, with settings overrides."""
    made: list[tuple[Platform, dict[str, Any]]] = []

    def make(**overrides: Any) -> Platform:
        settings = fleet.settings.model_copy(update=overrides)
        conninfo = fresh_platform_db(fleet)
        p = Platform(settings, conninfo)
        p.sync_servers()
        made.append((p, conninfo))
        return p

    yield make
    for p, conninfo in made:
        p.close()
        drop_platform_db(fleet, conninfo)
    fleet.wipe_tenants()


@pytest.fixture
def platform(platform_factory: Any) -> Platform:
    p: Platform = platform_factory()
    return p


@pytest.fixture
def owner(platform: Platform) -> tuple[Owner, str]:
    return create_owner(platform, "alice")


@pytest.fixture
def admin(platform: Platform) -> tuple[Owner, str]:
    return create_owner(platform, "admin", is_admin=True)


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


@pytest.fixture
def client(platform: Platform) -> Iterator[TestClient]:
    with TestClient(create_app(platform)) as c:
        yield c


@pytest.fixture
def api(client: TestClient, owner: tuple[Owner, str]) -> Api:
    return Api(client, owner[1])


@pytest.fixture
def admin_api(client: TestClient, admin: tuple[Owner, str]) -> Api:
    return Api(client, admin[1])


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


@pytest.fixture
def api_url(platform: Platform) -> Iterator[str]:
    """A real uvicorn server for `platform` on a free port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(platform), host="127.0.0.1", port=port, log_level="warning", access_log=False
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


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CLI must not pick up a developer's ./.pgfleet (admin token, api.json)."""
    monkeypatch.chdir(tmp_path)
    for var in ("PGFLEET_URL", "PGFLEET_TOKEN", "PGFLEET_HOME"):
        monkeypatch.delenv(var, raising=False)
    yield
    gc.collect()


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Arms a failpoint for this process's embedded worker; returns
    (reached, release): wait until a worker stops there, let it go on."""

    def arm(name: str) -> Any:
        monkeypatch.setenv("PGFLEET_FAILPOINTS", name)
        monkeypatch.setenv("PGFLEET_FAILPOINT_DIR", str(tmp_path))

        def reached() -> None:
            end = time.monotonic() + 30
            while not (tmp_path / f"{name}.reached").exists():
                assert time.monotonic() < end, f"{name} not reached"
                time.sleep(0.02)

        def release() -> None:
            (tmp_path / f"{name}.release").touch()

        return reached, release

    return arm
