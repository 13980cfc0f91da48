"""Running SQL for a project: logged in as the project's own role, one
statement per call, with timeouts and result caps enforced by pgfleet.

The SQL API's whole path runs on the API's event loop (`SqlGateway`): the
token and project in one platform round trip (or none: see auth.AuthCache),
the statement on a pooled connection of the project's role, no thread hops.
One process serves about 800 `select 1` a second on one core; the API runs
one process per core.

- One statement: the query always goes through the extended protocol, which
  refuses several commands in one string (`COMMIT; INSERT ...`).
- Timeouts: the role's plan default statement_timeout, and a timer that
  cancels the statement from outside at the request's timeout_ms, so nothing
  the SQL sets can escape the limit; a statement that catches the cancel
  has its session terminated a second later. The session is reset
  (DISCARD ALL) before the connection is reused, after the answer has gone
  out.
- `ro` runs as the project's read-only role (SELECT only, every transaction
  read-only by the role's own default).
- Results are capped by rows and by bytes and say when they were truncated:
  a read stops at the caps, a write runs to its end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast

import psycopg
from psycopg import sql
from psycopg.abc import PQGen
from psycopg.generators import fetch
from psycopg.pq import ExecStatus
from psycopg.pq.abc import PGresult
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pgfleet.auth import AUTH_CHANNEL, AuthCache, authenticate_with_project_async
from pgfleet.errors import (
    Conflict,
    InvalidInput,
    PgfleetError,
    ProjectNotFound,
    RegionUnavailable,
)
from pgfleet.monitoring.fingerprint import fingerprint
from pgfleet.platform.core import Platform
from pgfleet.platform.db import AsyncPlatformDB
from pgfleet.pooling import is_suspect, mark_returned
from pgfleet.regions import get_plan
from pgfleet.tenants.connections import (
    Mode,
    PoolCache,
    PoolEntry,
    TenantEndpoint,
    check_mode,
    refusal,
)
from pgfleet.tenants.service import Owner

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 100_000
MAX_PARAMS = 1000
DEFAULT_TIMEOUT_MS = 10_000
DEFAULT_MAX_ROWS = 1000


class TooManyStatements(PgfleetError):
    """The project's SQL API connections in this process are all busy."""

    status_code = 429
    code = "too_many_statements"


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
    approx_bytes: int = 0  # the rows' JSON size, for the answer's encoding


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


class _StatementCursor(psycopg.AsyncRawCursor[Any]):
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


async def _type_names(
    conn: psycopg.AsyncConnection[Any], tenant_id: uuid.UUID, description: Sequence[Any]
) -> list[dict[str, str]]:
    """Column names and types. Types psycopg does not know (enums, domains,
    extensions: it shows their OID) are named by the server, cached per project."""
    for c in description:
        key = (tenant_id, c.type_code)
        if c.type_display.isdigit() and key not in _TYPE_NAMES:
            cur = await conn.execute("SELECT pg_catalog.format_type(%s, NULL)", (c.type_code,))
            row = await cur.fetchone()
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


def visible_project(owner: Owner, project_id: str, row: dict[str, Any] | None) -> dict[str, Any]:
    """The row if the owner may run SQL on it, else 404 (or 409 if it is not
    active)."""
    if (
        row is None
        or row["status"] == "deleted"
        or (not owner.is_admin and row["owner_id"] != owner.id)
    ):
        raise ProjectNotFound(f"project {project_id} not found")
    if row["status"] != "active":
        raise Conflict(
            f"project {row['id']} is {row['status']}; SQL runs only on active projects",
            status=row["status"],
        )
    return row


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    for name, loader in _SQL_LOADERS:
        conn.adapters.register_loader(name, loader)


async def _reset(conn: psycopg.AsyncConnection[Any]) -> None:
    """Whatever the last statement SET (timeouts, temp tables, advisory
    locks, LISTEN), the next one starts clean."""
    await conn.execute("DISCARD ALL")
    mark_returned(conn)


async def _check_pooled(conn: psycopg.AsyncConnection[Any]) -> None:
    if is_suspect(conn):
        await AsyncConnectionPool.check_connection(conn)


async def _mark_returned(conn: psycopg.AsyncConnection[Any]) -> None:
    mark_returned(conn)


class SqlGateway:
    """The SQL API, on the event loop. One per API process and event loop
    (the app's lifespan opens and closes it): a platform DB pool for the
    token and project lookup, and per (project, mode) pools of connections
    logged in as the project's roles, capped like the synchronous client's."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._db: AsyncPlatformDB | None = None
        self._pools: PoolCache[AsyncConnectionPool] = PoolCache(
            lambda: platform.settings.tenant_pool_cap_per_process
        )
        self._background: set[asyncio.Task[Any]] = set()
        self.auth_cache = AuthCache()
        self._listener: asyncio.Task[None] | None = None
        self.listen_retry_s = 1.0

    async def open(self) -> None:
        s = self.platform.settings

        def make_pool() -> AsyncConnectionPool:
            return AsyncConnectionPool(
                kwargs={
                    **self.platform.conninfo,
                    "application_name": "pgfleet",
                    "autocommit": True,
                },
                min_size=1,
                max_size=16,
                timeout=s.connect_timeout_s,
                check=_check_pooled,
                reset=_mark_returned,
                name="platform-sql",
                open=False,
            )

        self._db = AsyncPlatformDB(
            self.platform.conninfo, breaker=self.platform.breaker, make_pool=make_pool
        )
        await self._db.open()
        self.platform.pool_counters.append(self.pool_count)
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        """Keep a LISTEN on the auth channel; the cache is live only while it is."""
        cache = self.auth_cache
        failing = False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    **{
                        **self.platform.conninfo,
                        "application_name": "pgfleet-auth-listen",
                        "autocommit": True,
                        "connect_timeout": 2,
                        # A silently dead link is noticed in seconds.
                        "keepalives": 1,
                        "keepalives_idle": 5,
                        "keepalives_interval": 2,
                        "keepalives_count": 2,
                    }
                )
                async with conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(AUTH_CHANNEL)))
                    if failing:
                        log.warning("auth cache on again")
                    failing = False
                    cache.clear()
                    cache.live = True
                    async for notice in conn.notifies():
                        cache.invalidate(notice.payload)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # whatever it was, retry; the cache is off meanwhile
                if not failing:  # once per state change, not once a second
                    log.warning("auth cache off: %s", e.__class__.__name__)
                failing = True
            finally:
                cache.live = False
                cache.clear()
            await asyncio.sleep(self.listen_retry_s)

    def pool_count(self) -> int:
        return len(self._pools)

    async def close(self) -> None:
        if self.pool_count in self.platform.pool_counters:
            self.platform.pool_counters.remove(self.pool_count)
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await task
        for pool in self._pools.drain():
            await pool.close(timeout=1)
        if self._db is not None:
            await self._db.close(timeout=1)

    @property
    def db(self) -> AsyncPlatformDB:
        if self._db is None:
            raise RuntimeError("the SQL gateway is not open")
        return self._db

    async def authenticate(
        self, token: str | None, project_id: str
    ) -> tuple[Owner, dict[str, Any] | None]:
        """The token's owner and the project's row, in one round trip."""
        return await authenticate_with_project_async(self.db, token, project_id, self.auth_cache)

    async def project_row(self, owner: Owner, project_id: str) -> dict[str, Any]:
        try:
            tid = uuid.UUID(str(project_id))
        except ValueError:
            raise ProjectNotFound(f"project {project_id} not found") from None
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT id, owner_id, region, status, plan_type, connection_info "
                "FROM tenants WHERE id = %s",
                (tid,),
            )
            row = await cur.fetchone()
        return visible_project(owner, project_id, row)

    async def run(
        self, owner: Owner, project_id: str, req: SqlRequest, project_row: dict[str, Any] | None
    ) -> SqlResult:
        """Run one statement for the owner's project. `project_row` (id,
        owner_id, region, status, plan_type, connection_info) is the row
        authenticate() returned (None: no such project)."""
        project = visible_project(owner, project_id, project_row)
        mode = check_mode(req.mode)
        limits = plan_limits(project["plan_type"])
        timeout_ms, max_rows = _check(req, limits)
        shape = fingerprint(req.query)
        _refuse_unsupported(shape)
        tid = project["id"]
        endpoint = self.platform.client.endpoint_from_row(project)
        started_at = dt.datetime.now(dt.UTC)
        t0 = time.perf_counter()
        outcome = "error"
        row_count: int | None = None
        try:
            entry, conn = await self._connect(endpoint, mode, project["plan_type"])
            reusable = False
            try:
                result, reusable = await _execute(
                    conn,
                    tid,
                    req,
                    shape,
                    mode,
                    timeout_ms,
                    max_rows,
                    limits["max_bytes"],
                    lambda pid: self._terminate(endpoint, pid),
                )
            finally:
                await self._give_back(entry, conn, reusable)
            row_count = result.row_count
            outcome = "ok"
        except _TimedOut:
            outcome = "57014"
            raise SqlError(
                f"statement canceled: it ran longer than timeout_ms={timeout_ms}",
                sqlstate="57014",
                position=None,
                detail="it ignored the cancel request, so its session was ended",
                hint=None,
            ) from None
        except psycopg.Error as e:
            if e.sqlstate is None or conn.broken:
                # The server went away mid-statement (no SQLSTATE: the link broke).
                outcome = e.sqlstate or "08006"
                raise RegionUnavailable(
                    f"region {endpoint.hosted_region} is unavailable: lost the connection "
                    "to the project's server during the statement",
                    region=endpoint.hosted_region,
                ) from e
            outcome = e.sqlstate
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
        except PgfleetError as e:
            outcome = e.code
            raise
        finally:
            elapsed = (time.perf_counter() - t0) * 1000
            self._record(endpoint, mode, outcome, elapsed, row_count, shape, started_at)
        result.duration_ms = round(elapsed, 3)
        result.limits = {
            "timeout_ms": timeout_ms,
            "max_rows": max_rows,
            "max_bytes": limits["max_bytes"],
            "plan_max_timeout_ms": limits["max_timeout_ms"],
            "plan_max_rows": limits["max_rows"],
        }
        return result

    def _record(
        self,
        endpoint: TenantEndpoint,
        mode: str,
        outcome: str,
        elapsed_ms: float,
        row_count: int | None,
        shape: str,
        started_at: dt.datetime,
    ) -> None:
        metrics = self.platform.metrics
        metrics.queries.labels(endpoint.hosted_region, mode, outcome).inc()
        metrics.query_duration.labels(endpoint.hosted_region, mode).observe(elapsed_ms / 1000)
        self.platform.query_log.log(
            endpoint.log_record(
                mode,
                elapsed_ms=elapsed_ms,
                row_count=row_count,
                outcome=outcome,
                shape=shape,
                started_at=started_at,
            )
        )

    def pool_size(self, plan_type: str | None) -> int:
        """Connections one API process keeps per (project, mode): at most
        PGFLEET_TENANT_POOL_SIZE, and all processes together at most half
        the role's connection limit, so the project's own clients keep the
        other half."""
        s = self.platform.settings
        share = get_plan(plan_type or "free").connection_limit // 2 // s.api_workers
        return max(1, min(s.tenant_pool_size, share))

    def _make_pool(self, endpoint: TenantEndpoint, mode: Mode, size: int) -> AsyncConnectionPool:
        s = self.platform.settings
        return AsyncConnectionPool(
            kwargs={
                **endpoint.conninfo(mode, s.connect_timeout_s),
                # Each call is its own transaction; no server-side prepared
                # statements (DISCARD ALL drops them).
                "autocommit": True,
                "prepare_threshold": None,
            },
            min_size=0,
            max_size=size,
            # One worker per connection: resets (DISCARD ALL) run in the
            # pool's workers and must not queue behind each other.
            num_workers=size,
            timeout=s.connect_timeout_s,
            max_idle=60,
            configure=_configure,
            check=_check_pooled,
            reset=_reset,
            name=f"{endpoint.database}-{mode}-sql",
            open=False,
        )

    async def _connect(
        self, endpoint: TenantEndpoint, mode: Mode, plan_type: str | None
    ) -> tuple[PoolEntry[AsyncConnectionPool], psycopg.AsyncConnection[Any]]:
        size = self.pool_size(plan_type)
        entry, stale = self._pools.take(
            endpoint, mode, lambda: self._make_pool(endpoint, mode, size), size
        )
        for pool in stale:
            self._spawn(pool.close(timeout=5))
        try:
            if entry.pool.closed:
                # Opened on first use, on this loop; open() is idempotent.
                await entry.pool.open(wait=False)
            conn = await entry.pool.getconn()
            entry.checked_out += 1
            return entry, conn
        except (PoolTimeout, psycopg.OperationalError) as e:
            self._pools.give_back(entry)
            if isinstance(e, PoolTimeout) and entry.checked_out > 0:
                # The server is there: this project's connections are all busy.
                raise TooManyStatements(
                    f"project {endpoint.tenant_id} already runs {entry.pool.max_size} "
                    f"{mode} statements through the SQL API in this API process, its most "
                    "at once; retry when one has finished",
                    limit=entry.pool.max_size,
                ) from None
            # Retry afresh next time, without the pool's reconnection backoff.
            self._pools.discard(entry)
            self._spawn(entry.pool.close(timeout=5))
            raise await asyncio.to_thread(refusal, self.platform, endpoint, mode, plan_type) from e
        except BaseException:
            self._pools.give_back(entry)
            raise

    async def _give_back(
        self,
        entry: PoolEntry[AsyncConnectionPool],
        conn: psycopg.AsyncConnection[Any],
        reusable: bool,
    ) -> None:
        try:
            if not reusable:
                # A cancel may still be on its way to it: never reuse it.
                await conn.close()
            # With a reset callback the pool resets the connection (DISCARD ALL)
            # in its own worker task: the answer does not wait for it.
            await entry.pool.putconn(conn)
        finally:
            entry.checked_out -= 1
            self._pools.give_back(entry)

    async def _terminate(self, endpoint: TenantEndpoint, backend_pid: int) -> None:
        """End a session that ignores cancel requests (PL/pgSQL can catch
        them), through the server's admin connection."""

        def kill() -> None:
            server = self.platform.servers.get(endpoint.server_id)
            with self.platform.servers.admin_connection(server) as conn:
                # Only a session of this project's own roles, whatever the pid.
                conn.execute(
                    "SELECT pg_catalog.pg_terminate_backend(a.pid) "
                    "FROM pg_catalog.pg_stat_activity a "
                    "WHERE a.pid = %s AND a.datname = %s",
                    (backend_pid, endpoint.database),
                )

        await asyncio.to_thread(kill)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _TimedOut(Exception):
    """The statement ignored its cancel and its session had to be ended."""


# Statements that only read: when their rows pass the caps, the rest are not
# read (the statement is cancelled). Anything else (INSERT ... RETURNING, a
# data-modifying WITH) is read to its end, so a truncated answer never hides
# a write that was rolled back.
_READS = frozenset({"select", "values", "table", "show", "explain", "fetch"})
_WRITES = re.compile(r"\b(insert|update|delete|merge)\b")
TERMINATE_GRACE_S = 1.0
_INLINE_ROWS = 500  # rows converted on the event loop; beyond, in a thread


def _to_rows(raw: list[Any]) -> list[tuple[list[Any], int]]:
    out = []
    for r in raw:
        row = [to_json(v) for v in r]
        out.append((row, len(json.dumps(row, default=str))))
    return out


async def _execute(
    conn: psycopg.AsyncConnection[Any],
    tenant_id: uuid.UUID,
    req: SqlRequest,
    shape: str,
    mode: str,
    timeout_ms: int,
    max_rows: int,
    max_bytes: int,
    terminate: Callable[[int], Coroutine[Any, Any, None]],
) -> tuple[SqlResult, bool]:
    """The statement's result, and whether its connection may be reused."""
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Task[None]] = []
    terminated = False

    def overdue() -> None:
        # From outside the session, so nothing the statement SET can stop it.
        pending.append(loop.create_task(conn.cancel_safe(timeout=2)))

    def stuck() -> None:
        nonlocal terminated
        terminated = True
        pending.append(loop.create_task(terminate(conn.info.backend_pid)))

    timers = [
        loop.call_later(timeout_ms / 1000, overdue),
        loop.call_later(timeout_ms / 1000 + TERMINATE_GRACE_S, stuck),
    ]
    first = shape.split(" ", 1)[0].rstrip(";")
    reads = first in _READS or (first == "with" and not _WRITES.search(shape))
    clean = False
    try:
        async with _StatementCursor(conn) as cur:
            rows: list[list[Any]] = []
            truncated = False
            size = seen = 0
            batch: list[Any] = []

            def take(converted: list[tuple[list[Any], int]]) -> None:
                nonlocal truncated, size
                for row, n in converted:
                    if truncated:
                        return
                    if len(rows) >= max_rows or size + n > max_bytes:
                        truncated = True
                        return
                    size += n
                    rows.append(row)

            # stream() always uses the extended protocol, which runs exactly one
            # statement, and lets us stop reading at the caps.
            stream = cast(
                AsyncGenerator[Any, None],
                cur.stream(req.query, list(req.params), size=min(max_rows + 1, 1000)),
            )
            try:
                async with contextlib.aclosing(stream):
                    async for raw in stream:
                        seen += 1
                        if truncated:
                            continue  # a write: read to its end, keep nothing
                        if seen <= _INLINE_ROWS:
                            take(_to_rows([raw]))
                        else:
                            # A large result: convert in a thread, so other
                            # requests on this loop are not held up.
                            batch.append(raw)
                            if len(batch) >= _INLINE_ROWS:
                                take(await asyncio.to_thread(_to_rows, batch))
                                batch = []
                        if truncated and reads:
                            break
                    if batch and not truncated:
                        take(await asyncio.to_thread(_to_rows, batch))
            except psycopg.Error:
                if terminated:
                    raise _TimedOut() from None
                raise
            for t in timers:
                t.cancel()
            # Wait out a cancel sent as the statement ended before the next
            # query, so it cannot land on that one; the statement stands.
            for task in pending:
                with contextlib.suppress(Exception):
                    await task
            if terminated:
                raise _TimedOut()
            columns = (
                await _type_names(conn, tenant_id, cur.description)
                if cur.description is not None
                else []
            )
            final = cur.final
            command = (final.command_status or b"").decode() if final is not None else ""
            if not command:  # libpq leaves the tag empty after chunked rows
                command = shape.split(" ", 1)[0].upper()
            if cur.description is None:
                row_count = final.command_tuples or 0 if final is not None else 0
            else:
                row_count = len(rows) if reads else seen
        clean = True
    finally:
        for t in timers:
            t.cancel()
        settled = True
        for task in pending:
            try:
                await asyncio.shield(task)
            except Exception:
                settled = False
            except asyncio.CancelledError:
                settled = False
                raise
    result = SqlResult(columns, rows, row_count, truncated, 0.0, command, mode)
    result.approx_bytes = size
    return result, clean and settled and not terminated and not conn.broken
