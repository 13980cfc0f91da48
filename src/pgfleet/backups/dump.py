"""Copying one database out and in, always as a project's own role.

pg_dump runs as the project's owner role, never as a superuser: a superuser's
pg_dump inside a database its tenant controls can be made to run the
tenant's code (CVE-2024-7348). What the tenant planted there then runs with
the tenant's own rights, which it has anyway.

A manifest (each table's row count and an order-independent checksum of
its rows) is read in the same snapshot the dump is taken from, so a restore
can prove it brought back exactly what was dumped.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgfleet.errors import FleetError
from pgfleet.operations.registry import Interrupted

# Every session of ours in a tenant database starts with these: names resolve
# in pg_catalog first, and rows print the same way on both sides of a copy.
SESSION_SETUP = (
    "SET search_path = pg_catalog, pg_temp",
    "SET datestyle = 'ISO, MDY'",
    "SET timezone = 'UTC'",
    "SET intervalstyle = 'postgres'",
    "SET extra_float_digits = 1",
    "SET bytea_output = 'hex'",
    "SET statement_timeout = 0",
    "SET lock_timeout = '30s'",
)

_TABLES = """
SELECT n.nspname, c.relname
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE c.relkind OPERATOR(pg_catalog.=) 'r'
  AND n.nspname OPERATOR(pg_catalog.<>) ALL (ARRAY['pg_catalog', 'information_schema'])
  AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%'
ORDER BY 1, 2
"""

Manifest = dict[str, dict[str, Any]]


def setup_session(conn: psycopg.Connection[Any]) -> None:
    for stmt in SESSION_SETUP:
        conn.execute(stmt)


def manifest(conn: psycopg.Connection[Any]) -> Manifest:
    """{"schema.table": {"rows": n, "checksum": "..."}} for every table of
    the database the session is in (run inside the dump's snapshot)."""
    out: Manifest = {}
    for schema, table in conn.execute(_TABLES).fetchall():
        query = sql.SQL(
            "SELECT pg_catalog.count(*), coalesce(pg_catalog.sum("
            "pg_catalog.hashtextextended(t::pg_catalog.text, 0)), 0)::pg_catalog.text "
            "FROM ONLY {}.{} AS t"
        ).format(sql.Identifier(schema), sql.Identifier(table))
        row = conn.execute(query).fetchone()
        assert row is not None
        out[f"{schema}.{table}"] = {"rows": int(row[0]), "checksum": str(row[1])}
    return out


@contextmanager
def cancelled_on_stop(conn: psycopg.Connection[Any], stop: StopReason | None) -> Iterator[None]:
    """While inside: a query of `conn` is cancelled as soon as `stop` says so
    (a tenant's slow policy or type must not hold a worker for hours);
    Interrupted is raised then."""
    if stop is None:
        yield
        return
    done = threading.Event()
    why: list[str] = []

    def watch() -> None:
        while not done.wait(1.0):
            reason = stop()
            if reason is not None:
                why.append(reason)
                conn.cancel_safe()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    except psycopg.errors.QueryCanceled:
        if why:
            raise Interrupted(f"reading the tables stopped: the operation was {why[0]}") from None
        raise
    finally:
        done.set()
        watcher.join()


def compare(expected: Manifest, got: Manifest) -> list[str]:
    """What differs between two manifests, in words (empty: the same)."""
    problems = []
    for name in sorted(set(expected) | set(got)):
        want, have = expected.get(name), got.get(name)
        if want is None:
            problems.append(f"table {name} was not in the source")
        elif have is None:
            problems.append(f"table {name} is missing")
        elif want["rows"] != have["rows"]:
            problems.append(f"table {name} has {have['rows']} rows, the source {want['rows']}")
        elif want["checksum"] != have["checksum"]:
            problems.append(f"table {name}'s rows differ from the source's (checksum)")
    return problems


def _env(password: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    if password:
        env["PGPASSWORD"] = password  # never in argv, where ps shows it
    return env


def _dsn(conninfo: dict[str, Any]) -> tuple[str, str | None]:
    ci = {k: v for k, v in conninfo.items() if k != "password" and v is not None}
    return make_conninfo(**ci), conninfo.get("password")


StopReason = Callable[[], str | None]


def run_watched(
    args: list[str], env: dict[str, str], *, what: str, stop: StopReason | None = None
) -> None:
    """Run `args`, asking `stop` every second whether to kill it (an
    operation cancelled or past its deadline: a tenant's slow objects must
    not hold a worker for hours). FleetError with its stderr if it fails;
    Interrupted if stopped."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            while True:
                try:
                    proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    reason = stop() if stop is not None else None
                    if reason is not None:
                        proc.kill()
                        proc.wait()
                        raise Interrupted(f"{what} stopped: the operation was {reason}") from None
        finally:
            if proc.poll() is None:  # an exception of our own: leave nothing running
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            err.seek(0)
            text = err.read().decode(errors="replace").strip()
            raise FleetError(f"{what} failed: {text[-1000:]}")


def pg_dump(
    binary: str,
    conninfo: dict[str, Any],
    out: Path,
    *,
    snapshot: str | None = None,
    stop: StopReason | None = None,
) -> None:
    """A custom-format dump of the database `conninfo` names, as its user.
    A lock it cannot get within a minute fails it (a tenant's queue of
    lock requests must not hold it forever)."""
    dsn, password = _dsn(conninfo)
    args = [
        binary,
        "--format=custom",
        "--no-password",
        "--lock-wait-timeout=60s",
        f"--file={out}",
        f"--dbname={dsn}",
    ]
    if snapshot:
        args.append(f"--snapshot={snapshot}")
    run_watched(args, _env(password), what="pg_dump", stop=stop)


def pg_restore(
    binary: str, conninfo: dict[str, Any], dump: Path, *, stop: StopReason | None = None
) -> None:
    """The dump into the (empty) database `conninfo` names, as its user: all
    or nothing (one transaction), objects owned by that user."""
    dsn, password = _dsn(conninfo)
    args = [
        binary,
        "--no-owner",
        "--no-privileges",
        "--exit-on-error",
        "--single-transaction",
        "--no-password",
        f"--dbname={dsn}",
        str(dump),
    ]
    run_watched(args, _env(password), what="pg_restore", stop=stop)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
