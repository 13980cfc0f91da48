"""The test suite starts its own embedded fleet once per run (fsync off) and
gives every test a fresh platform DB made from a migrated template."""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

from pgfleet.api.app import create_app
from pgfleet.auth import create_owner
from pgfleet.platform import migrate
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from tests.helpers import Api, FleetUnderTest, free_port_block, make_settings, serve

# The seed's host variables would switch pgfleet to external servers.
for _var in ("POSTGRES_HOST_US_EAST", "POSTGRES_HOST_EU", "POSTGRES_HOST_APAC", "PGFLEET_CONFIG"):
    os.environ.pop(_var, None)


def _name_where_leaked_sessions_were_opened() -> None:
    """A session left to the garbage collector warns from wherever the
    collector happens to run, often a later test of another module. Each
    direct session remembers where it was opened, and the warning says so."""
    opened = psycopg.Connection.connect.__func__  # type: ignore[attr-defined]
    finalize = psycopg.Connection.__del__

    def connect(cls: Any, *args: Any, **kwargs: Any) -> Any:
        conn = opened(cls, *args, **kwargs)
        conn._opened_at = "".join(traceback.format_stack(limit=14)[:-1])
        return conn

    def __del__(self: Any) -> None:
        where = getattr(self, "_opened_at", None)
        # A pool's sessions are the pool's to end (psycopg does not warn either).
        pooled = hasattr(self, "_pool")
        if where is not None and hasattr(self, "pgconn") and not self.closed and not pooled:
            self.pgconn.finish()
            message = f"a session was left open; it was opened at:\n{where}"
            warnings.warn(message, ResourceWarning, stacklevel=2)
        finalize(self)

    psycopg.Connection.connect = classmethod(connect)  # type: ignore[method-assign,assignment]
    psycopg.Connection.__del__ = __del__  # type: ignore[method-assign,assignment]
    psycopg.connect = psycopg.Connection.connect  # the module's alias of it


_name_where_leaked_sessions_were_opened()

# The fuzz test's coverage. Schemathesis reports each operation as a
# subtest of one pytest test, and pytest-xdist spreads those over the
# processes, so pytest's count cannot show that every operation was fuzzed
# (under --dist loadfile the test passed having run 10 of its 1,573 cases).
# Each process reports the operations it called; the session fails if the
# fuzz test ran and one of the document's operations was never called.
_fuzzed_by_workers: set[str] = set()


def _fuzzed_here() -> set[str]:
    return set(getattr(sys.modules.get("tests.test_fuzz"), "FUZZED", ()))


def pytest_testnodedown(node: Any, error: Any) -> None:
    """An xdist worker ended (called in the controller)."""
    _fuzzed_by_workers.update(getattr(node, "workeroutput", {}).get("fuzzed", ()))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    fuzzed = _fuzzed_here() | _fuzzed_by_workers
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller checks
        workeroutput["fuzzed"] = sorted(fuzzed)
        return
    if not fuzzed:
        return  # the fuzz test was not run
    from tests.test_fuzz import all_operations

    missing = sorted(all_operations() - fuzzed)
    if missing:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"the fuzz test never called {len(missing)} operation(s): {', '.join(missing)}"
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


TEMPLATE_DB = "pgfleet_template"
_db_counter = itertools.count()


@pytest.fixture(scope="session")
def fleet() -> Iterator[FleetUnderTest]:
    # Not under pytest's tmp dir: that is 0700, and the servers run as an
    # unprivileged user when the suite runs as root.
    home = Path(tempfile.mkdtemp(prefix="pgfleet-test-"))
    os.chmod(home, 0o755)
    settings = make_settings(home, free_port_block(60))
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


@pytest.fixture
def api_url(platform: Platform) -> Iterator[str]:
    """A real uvicorn server for `platform` on a free port, in a thread."""
    with serve(platform) as url:
        yield url


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
