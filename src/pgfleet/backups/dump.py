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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgfleet.errors import FleetError

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


def pg_dump(
    binary: str,
    conninfo: dict[str, Any],
    out: Path,
    *,
    snapshot: str | None = None,
    run: Callable[..., subprocess.CompletedProcess[str]] | None = None,
) -> None:
    """A custom-format dump of the database `conninfo` names, as its user."""
    dsn, password = _dsn(conninfo)
    args = [binary, "--format=custom", "--no-password", f"--file={out}", f"--dbname={dsn}"]
    if snapshot:
        args.append(f"--snapshot={snapshot}")
    res = (run or subprocess.run)(
        args, capture_output=True, text=True, env=_env(password), timeout=6 * 3600
    )
    if res.returncode != 0:
        raise FleetError(f"pg_dump failed: {res.stderr.strip()[-1000:]}")


def pg_restore(binary: str, conninfo: dict[str, Any], dump: Path) -> None:
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
    res = subprocess.run(args, capture_output=True, text=True, env=_env(password), timeout=6 * 3600)
    if res.returncode != 0:
        raise FleetError(f"pg_restore failed: {res.stderr.strip()[-1000:]}")


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
