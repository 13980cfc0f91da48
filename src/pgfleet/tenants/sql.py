"""Running SQL for a project: logged in as the project's own role, one
statement per call, with timeouts and result caps enforced by pgfleet.

- One statement: the query always goes through the extended protocol, which
  refuses several commands in one string (`COMMIT; INSERT ...`).
- Timeouts: a transaction-local statement_timeout, and a watchdog that
  cancels the statement from outside if it still runs, so nothing the SQL
  sets can escape the limit. The session is reset (DISCARD ALL) before the
  connection is reused.
- `ro` runs as the project's read-only role in a READ ONLY transaction.
- Results are capped by rows and by bytes and say when they were truncated.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.abc import PQGen
from psycopg.generators import fetch
from psycopg.pq import ExecStatus
from psycopg.pq.abc import PGresult
from psycopg.rows import dict_row

from pgfleet.errors import Conflict, InvalidInput, PgfleetError, ProjectNotFound
from pgfleet.monitoring.fingerprint import fingerprint
from pgfleet.monitoring.querylog import QueryLogRecord
from pgfleet.platform.core import Platform
from pgfleet.regions import get_plan
from pgfleet.tenants.connections import check_mode
from pgfleet.tenants.service import Owner
from pgfleet.tenants.watchdog import WATCHDOG

MAX_QUERY_CHARS = 100_000
MAX_PARAMS = 1000
DEFAULT_TIMEOUT_MS = 10_000
DEFAULT_MAX_ROWS = 1000
WATCHDOG_GRACE_MS = 0


class SqlError(PgfleetError):
    """The statement failed."""

    status_code = 400
    code = "sql_error"


@dataclass(frozen=True)
class SqlRequest:
    query: str
    params: Sequence[Any] = ()
    mode: str = "rw"
    timeout_ms: int | None = None
    max_rows: int | None = None


@dataclass
class SqlResult:
    columns: list[dict[str, str]]
    rows: list[list[Any]]
    row_count: int
    truncated: bool
    duration_ms: float
    command: str
    mode: str
    limits: dict[str, int] = field(default_factory=dict)


def plan_limits(plan_type: str | None) -> dict[str, int]:
    plan = get_plan(plan_type or "free")
    return {
        "max_timeout_ms": plan.statement_timeout_ms,
        "max_rows": plan.max_result_rows,
        "max_bytes": plan.max_result_bytes,
    }


def _check(req: SqlRequest, limits: dict[str, int]) -> tuple[int, int]:
    if not req.query.strip():
        raise InvalidInput("query must not be empty", field="query")
    if len(req.query) > MAX_QUERY_CHARS:
        raise InvalidInput(
            f"query is {len(req.query)} characters; at most {MAX_QUERY_CHARS} are allowed",
            field="query",
        )
    if len(req.params) > MAX_PARAMS:
        raise InvalidInput(f"at most {MAX_PARAMS} params are allowed", field="params")
    for p in req.params:
        if isinstance(p, dict | list):
            raise InvalidInput(
                "params must be strings, numbers, booleans or null "
                "(pass JSON as a string and cast it: $1::jsonb)",
                field="params",
            )
    timeout = req.timeout_ms if req.timeout_ms is not None else DEFAULT_TIMEOUT_MS
    timeout = min(timeout, limits["max_timeout_ms"]) if req.timeout_ms is None else timeout
    if not 1 <= timeout <= limits["max_timeout_ms"]:
        raise InvalidInput(
            f"timeout_ms must be between 1 and {limits['max_timeout_ms']} on this plan",
            field="timeout_ms",
        )
    rows = req.max_rows if req.max_rows is not None else min(DEFAULT_MAX_ROWS, limits["max_rows"])
    if not 0 <= rows <= limits["max_rows"]:
        raise InvalidInput(
            f"max_rows must be between 0 and {limits['max_rows']} on this plan",
            field="max_rows",
        )
    return timeout, rows


def to_json(value: Any) -> Any:
    """A JSON value that round-trips: numerics as strings, timestamps ISO 8601,
    bytea base64, NULL as null."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        # PostgreSQL's own spellings, which it reads back.
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return _iso_duration(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return str(value)
    return str(value)


def _iso_duration(td: dt.timedelta) -> str:
    seconds = td.total_seconds()
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    return f"{sign}P{int(days)}DT{int(hours)}H{int(minutes)}M{secs:g}S"


def run_sql(
    platform: Platform,
    owner: Owner,
    project_id: str,
    req: SqlRequest,
    *,
    project_row: dict[str, Any] | None = None,
) -> SqlResult:
    """Run one statement for the owner's project. `project_row` (id, owner_id,
    region, status, plan_type, connection_info) saves the lookup when the
    caller already has it."""
    project = _project(platform, owner, project_id, project_row)
    mode = check_mode(req.mode)
    if project["status"] != "active":
        raise Conflict(
            f"project {project['id']} is {project['status']}; SQL runs only on active projects",
            status=project["status"],
        )
    limits = plan_limits(project["plan_type"])
    timeout_ms, max_rows = _check(req, limits)
    shape = fingerprint(req.query)
    _refuse_unsupported(shape)
    tid = project["id"]
    endpoint = platform.client.endpoint_from_row(project)
    started_at = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    outcome = "ok"
    row_count: int | None = None
    try:
        with platform.client.get_tenant_connection(tid, mode, endpoint=endpoint) as conn:
            result = _execute(
                conn, tid, req, shape, mode, timeout_ms, max_rows, limits["max_bytes"]
            )
            row_count = result.row_count
    except psycopg.Error as e:
        outcome = e.sqlstate or "error"
        diag = e.diag
        message = diag.message_primary or str(e)
        if outcome == "57014":
            message = f"statement canceled: it ran longer than timeout_ms={timeout_ms}"
        raise SqlError(
            message,
            sqlstate=e.sqlstate,
            position=int(diag.statement_position) if diag.statement_position else None,
            detail=diag.message_detail,
            hint=diag.message_hint,
        ) from None
    finally:
        elapsed = (time.perf_counter() - t0) * 1000
        platform.metrics.queries.labels(endpoint.hosted_region, mode, outcome).inc()
        platform.metrics.query_duration.labels(endpoint.hosted_region, mode).observe(elapsed / 1000)
        platform.query_log.log(
            QueryLogRecord(
                tenant_id=tid,
                region=endpoint.region,
                hosted_region=endpoint.hosted_region,
                server_id=endpoint.server_id,
                route=mode,
                execution_time_ms=round(elapsed, 3),
                row_count=row_count,
                outcome=outcome,
                fingerprint=shape,
                executed_at=started_at,
            )
        )
    result.duration_ms = round(elapsed, 3)
    result.limits = {
        "timeout_ms": timeout_ms,
        "max_rows": max_rows,
        "max_bytes": limits["max_bytes"],
        "plan_max_timeout_ms": limits["max_timeout_ms"],
        "plan_max_rows": limits["max_rows"],
    }
    return result


class _StatementCursor(psycopg.RawCursor[Any]):
    """stream() for any one statement: rows are read in chunks (so caps stop
    the read early), and statements without rows (INSERT, DDL) are fine and
    keep their command tag. Overrides psycopg's private stream step; tested
    against the psycopg versions pyproject allows."""

    final: PGresult | None = None

    def _stream_fetchone_gen(self, first: bool) -> PQGen[PGresult | None]:
        res: PGresult | None = yield from fetch(self._pgconn)
        if res is None:
            return None
        status = res.status
        if status in (ExecStatus.SINGLE_TUPLE, ExecStatus.TUPLES_CHUNK):
            self.pgresult = res
            self._tx.set_pgresult(res, set_loaders=first)
            if first:
                self._make_row = self._make_row_maker()
            return res
        if status in (ExecStatus.TUPLES_OK, ExecStatus.COMMAND_OK):
            self.final = res
            if self.pgresult is None:
                self.pgresult = res
            while res:
                res = yield from fetch(self._pgconn)
            return None
        return self._raise_for_result(res)


# Statements that need a session of their own: each SQL API call is one
# statement in its own transaction, and results come back as rows.
_UNSUPPORTED = {
    "begin": "transaction control",
    "start": "transaction control",
    "commit": "transaction control",
    "end": "transaction control",
    "rollback": "transaction control",
    "abort": "transaction control",
    "savepoint": "transaction control",
    "release": "transaction control",
    "copy": "COPY",
}


def _refuse_unsupported(shape: str) -> None:
    first = shape.split(" ", 1)[0].rstrip(";")
    what = _UNSUPPORTED.get(first)
    if what is not None:
        raise InvalidInput(
            f"{what} ({first.upper()}) is not available through the SQL API: every call is "
            "one statement in its own transaction; use the connection string for sessions "
            "and COPY",
            field="query",
        )


class _TextFallbackMixin:
    """Load a value with psycopg's loader, or keep PostgreSQL's text when
    Python cannot hold it (infinity, years past 9999, BC dates)."""

    def load(self, data: Any) -> Any:
        try:
            return super().load(data)  # type: ignore[misc]
        except (psycopg.DataError, ValueError, OverflowError):
            return bytes(data).decode()


class _TextLoader(psycopg.adapt.Loader):
    def load(self, data: Any) -> str:
        return bytes(data).decode()


def _loaders() -> list[tuple[str, type[psycopg.adapt.Loader]]]:
    from psycopg.types import datetime as pgdt

    out: list[tuple[str, type[psycopg.adapt.Loader]]] = [
        # An interval has months, days and time; Python's timedelta has only
        # days, so '1 year' would come back as 365 days. Keep the server's text.
        ("interval", _TextLoader),
    ]
    for name, base in (
        ("date", pgdt.DateLoader),
        ("timestamp", pgdt.TimestampLoader),
        ("timestamptz", pgdt.TimestamptzLoader),
    ):
        out.append((name, type(f"Safe{base.__name__}", (_TextFallbackMixin, base), {})))
    return out


_SQL_LOADERS = _loaders()
_TYPE_NAMES: dict[tuple[uuid.UUID, int], str] = {}


def _type_names(
    conn: psycopg.Connection[Any], tenant_id: uuid.UUID, description: Sequence[Any]
) -> list[dict[str, str]]:
    """Column names and types. Types psycopg does not know (enums, domains,
    extensions: it shows their OID) are named by the server, cached per project."""
    for c in description:
        key = (tenant_id, c.type_code)
        if c.type_display.isdigit() and key not in _TYPE_NAMES:
            row = conn.execute("SELECT format_type(%s, NULL)", (c.type_code,)).fetchone()
            if len(_TYPE_NAMES) > 50_000:
                _TYPE_NAMES.clear()
            _TYPE_NAMES[key] = row[0] if row else c.type_display
    return [
        {
            "name": c.name,
            "type": _TYPE_NAMES.get((tenant_id, c.type_code), c.type_display)
            if c.type_display.isdigit()
            else c.type_display,
        }
        for c in description
    ]


def _project(
    platform: Platform, owner: Owner, project_id: str, row: dict[str, Any] | None
) -> dict[str, Any]:
    """The project row with its connection info, in one query; 404 unless the
    owner may see it."""
    if row is None:
        try:
            tid = uuid.UUID(str(project_id))
        except ValueError:
            raise ProjectNotFound(f"project {project_id} not found") from None
        with platform.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "SELECT id, owner_id, region, status, plan_type, connection_info "
                "FROM tenants WHERE id = %s",
                (tid,),
            ).fetchone()
    if (
        row is None
        or row["status"] == "deleted"
        or (not owner.is_admin and row["owner_id"] != owner.id)
    ):
        raise ProjectNotFound(f"project {project_id} not found")
    return row


def _execute(
    conn: psycopg.Connection[Any],
    tenant_id: uuid.UUID,
    req: SqlRequest,
    shape: str,
    mode: str,
    timeout_ms: int,
    max_rows: int,
    max_bytes: int,
) -> SqlResult:
    # Autocommit: the one statement is its own transaction (read-only for the
    # ro role by its role default), with no BEGIN/COMMIT round trips.
    conn.autocommit = True
    handle = WATCHDOG.arm(conn, (timeout_ms + WATCHDOG_GRACE_MS) / 1000)
    try:
        with _StatementCursor(conn) as cur:
            for name, loader in _SQL_LOADERS:
                cur.adapters.register_loader(name, loader)
            columns: list[dict[str, str]] = []
            rows: list[list[Any]] = []
            truncated = False
            size = 0
            # stream() always uses the extended protocol, which runs exactly one
            # statement, and lets us stop reading at the caps.
            for raw in cur.stream(req.query, list(req.params), size=min(max_rows + 1, 1000)):
                if len(rows) >= max_rows:
                    truncated = True
                    break
                row = [to_json(v) for v in raw]
                size += len(json.dumps(row, default=str))
                if size > max_bytes:
                    truncated = True
                    break
                rows.append(row)
            if cur.description is not None:
                columns = _type_names(conn, tenant_id, cur.description)
            final = cur.final
            command = (final.command_status or b"").decode() if final is not None else ""
            if not command:  # libpq leaves the tag empty after chunked rows
                command = shape.split(" ", 1)[0].upper()
            if cur.description is not None:
                row_count = len(rows)
            else:
                row_count = final.command_tuples or 0 if final is not None else 0
    finally:
        WATCHDOG.disarm(handle)
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
        conn.autocommit = False
    return SqlResult(columns, rows, row_count, truncated, 0.0, command, mode)
