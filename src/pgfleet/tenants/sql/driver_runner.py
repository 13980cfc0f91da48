"""Serving the HTTP driver's calls (see driver.py for the protocol): who is
logging in, then the statements, through the SQL API's gateway."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
import uuid
from typing import Any

import psycopg
from psycopg.generators import execute as execute_gen
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.rows import dict_row

from pgfleet.crypto import verifier_matches
from pgfleet.errors import PgfleetError, RegionUnavailable
from pgfleet.monitoring.fingerprint import fingerprint
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from pgfleet.tenants.connections import DatabasePlatformClient, Mode, TenantEndpoint
from pgfleet.tenants.naming import login_role_names, main_role_name, tenant_id_of
from pgfleet.tenants.sql.driver import (
    Credentials,
    DriverCall,
    DriverError,
    from_postgres,
    refused,
    result_body,
    row_count,
)
from pgfleet.tenants.sql.execute import TimedOut, Unanswered, execute
from pgfleet.tenants.sql.gateway import Session, SqlGateway
from pgfleet.tenants.sql.limits import (
    DEFAULT_TIMEOUT_MS,
    SqlRequest,
    first_word,
    plan_limits,
    refuse_unsupported,
)

_PROJECT = (
    "SELECT id, owner_id, region, status, plan_type, connection_info FROM tenants WHERE id = %s"
)
_VERIFIER = (
    "SELECT rolpassword, rolcanlogin, rolvaliduntil FROM pg_catalog.pg_authid WHERE rolname = %s"
)


def _role_secret(p: Platform, server_id: int, role: str) -> tuple[Any, ...] | None:
    """The role's SCRAM verifier, LOGIN and VALID UNTIL, from its server
    (read in the server's `postgres` database, never inside a tenant's)."""
    server = p.servers.get(server_id)
    with p.servers.admin_connection(server) as conn:
        return conn.execute(_VERIFIER, (role,)).fetchone()


async def login(gateway: SqlGateway, creds: Credentials) -> tuple[dict[str, Any], Mode]:
    """The project and mode these credentials log in to, checked as
    PostgreSQL checks a password (see driver.py); remembered for a few
    seconds while the platform's change notices are heard."""
    user, database = creds.user, creds.database
    tid = tenant_id_of(database)
    if tid is None or user not in login_role_names(database):
        raise refused(user)
    mode: Mode = "ro" if main_role_name(user).endswith("_ro") else "rw"
    cache = gateway.driver_cache
    hit = cache.get(creds.cache_key, str(tid))
    if hit is not None:
        return hit[1], mode
    generation = cache.generation
    async with gateway.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_PROJECT, (tid,))
        row = await cur.fetchone()
    info = (row or {}).get("connection_info") or {}
    if row is None or row["status"] in ("deleted", "deleting") or not info.get("server_id"):
        raise refused(user)
    secret = await asyncio.to_thread(_role_secret, gateway.platform, info["server_id"], user)
    if secret is None or not secret[0] or not verifier_matches(secret[0], creds.password):
        raise refused(user)
    _, can_login, valid_until = secret
    if valid_until is not None and valid_until < dt.datetime.now(dt.UTC):
        raise refused(user)
    if row["status"] != "active" or not can_login:
        raise DriverError(
            f'role "{user}" is not permitted to log in',
            code="28000",
            severity="FATAL",
            detail=f"project {tid} is {row['status']}",
            hint="resume the project to run SQL" if row["status"] == "paused" else None,
        )
    owner = Owner(row["owner_id"], "", False)
    # Dropped when the project or its owner changes (their notices name them).
    cache.put(
        creds.cache_key, str(tid), owner, row, uuid.uuid5(uuid.NAMESPACE_OID, user), generation
    )
    return row, mode


class _Call:
    """One driver call on one project: its limits, and each statement run,
    logged and turned into the driver's result."""

    def __init__(
        self, gateway: SqlGateway, project: dict[str, Any], mode: Mode, queries: list[SqlRequest]
    ) -> None:
        self.gateway = gateway
        self.project = project
        self.mode = mode
        self.endpoint: TenantEndpoint = DatabasePlatformClient.of(
            gateway.platform
        ).endpoint_from_row(project)
        limits = plan_limits(project["plan_type"])
        self.timeout_ms = min(DEFAULT_TIMEOUT_MS, limits["max_timeout_ms"])
        self.max_rows = limits["max_rows"]
        self.max_bytes = limits["max_bytes"]
        self.shapes: list[str] = []
        for i, q in enumerate(queries):
            if not q.query.strip():
                raise DriverError(f"query {i + 1} is empty", code="42601")
            shape = fingerprint(q.query)
            try:
                refuse_unsupported(shape)
            except PgfleetError as e:
                raise DriverError(e.message, code="0A000") from None
            self.shapes.append(shape)

    async def statement(
        self, held: Session, req: SqlRequest, shape: str, max_bytes: int, timeout_ms: int
    ) -> tuple[dict[str, Any], int]:
        """(the driver's result, about how many bytes it holds; -1 if it went
        over the caps: `max_bytes` and `timeout_ms`, what is left of the
        call's byte cap and time)."""
        started_at = dt.datetime.now(dt.UTC)
        t0 = time.perf_counter()
        outcome = "error"
        count: int | None = None
        # Not reused if this statement fails its session (an earlier one of
        # the batch may have left it reusable).
        held.reusable = False
        try:
            result, held.reusable = await execute(
                held.conn,
                self.project["id"],
                req,
                shape,
                self.mode,
                timeout_ms,
                self.max_rows,
                max_bytes,
                lambda pid: self.gateway.terminate(self.endpoint, pid),
                text=True,
            )
            count = result.row_count
            outcome = "ok" if not result.truncated else "too_large"
        except Unanswered:
            outcome = "08006"
            raise RegionUnavailable(
                f"region {self.endpoint.hosted_region} is unavailable: the project's server "
                "answered neither the statement nor its cancel",
                region=self.endpoint.hosted_region,
            ) from None
        except TimedOut:
            outcome = "57014"
            raise DriverError(
                f"canceling statement due to statement timeout ({self.timeout_ms} ms, the "
                "plan's); its session was ended, since it ignored the cancel",
                code="57014",
            ) from None
        except psycopg.Error as e:
            if e.sqlstate is None and not held.conn.broken:
                # psycopg refused it before sending: the request's fault.
                outcome = "invalid_input"
                raise DriverError(f"the statement was not sent: {e}", code="22023") from None
            outcome = e.sqlstate or "08006"
            if e.sqlstate is None or held.conn.broken:
                raise RegionUnavailable(
                    f"region {self.endpoint.hosted_region} is unavailable: lost the connection "
                    "to the project's server during the statement",
                    region=self.endpoint.hosted_region,
                ) from e
            err = from_postgres(e)
            if e.sqlstate == "57014":
                err.message = (
                    f"canceling statement due to statement timeout ({self.timeout_ms} ms for "
                    "the call, the plan's)"
                )
            raise err from None
        finally:
            elapsed = (time.perf_counter() - t0) * 1000
            self.gateway.record(
                self.endpoint, self.mode, outcome, elapsed, count, shape, started_at
            )
        if result.truncated:
            return {}, -1
        body = result_body(result.columns, result.rows, result.command, _count(result))
        return body, result.approx_bytes

    def too_large(self, what: str = "it was rolled back: nothing was changed") -> DriverError:
        return DriverError(
            f"the result is larger than this plan allows ({self.max_rows} rows or "
            f"{self.max_bytes} bytes); {what}",
            code="54000",
            hint="select fewer rows (LIMIT) or columns",
        )


# Commands PostgreSQL runs only outside a transaction block (or that manage
# transactions themselves, as a procedure may): a single query of these is
# not wrapped in one.
_OUTSIDE = frozenset({"vacuum", "cluster", "reindex", "checkpoint", "call"})
# Anchored at the start: a word anywhere else (a column aliased
# `concurrently`) must not take a write out of its transaction.
_OUTSIDE_SHAPES = re.compile(
    r"^((create|drop|alter) (database|tablespace|subscription)\b"
    r"|create (unique )?index concurrently\b|drop index concurrently\b"
    r"|reindex\b|alter system\b)"
)


def runs_outside_transactions(shape: str) -> bool:
    s = shape.lstrip("; \t\r\n")
    return first_word(s) in _OUTSIDE or _OUTSIDE_SHAPES.search(s) is not None


def plain_read(shape: str) -> bool:
    """A read that calls nothing (no parenthesis at all: no function, no
    subquery): it cannot write, so it needs no transaction of its own to be
    undone. (Only what the tenant itself defined could: a view over a
    function, an operator of its own.)"""
    return first_word(shape) in ("select", "table", "values", "show") and "(" not in shape


def _count(result: Any) -> int | None:
    count = row_count(result.command)
    if count is None and result.command.split(" ", 1)[0] in ("SELECT", "FETCH"):
        return int(result.row_count)
    return count


async def serve(gateway: SqlGateway, call: DriverCall) -> tuple[dict[str, Any], int]:
    """The answer's body to a driver call and about how many bytes its rows
    hold; DriverError (or a PgfleetError) if it failed."""
    project, mode = await login(gateway, call.credentials)
    run = _Call(gateway, project, mode, call.queries)
    async with gateway.session(run.endpoint, mode, project["plan_type"]) as held:
        if call.batch is None:
            return await _single(run, held, call.queries[0], run.shapes[0])
        return await _batch(run, held, call)


async def _single(
    run: _Call, held: Session, req: SqlRequest, shape: str
) -> tuple[dict[str, Any], int]:
    # A statement runs in a transaction that is rolled back when its result
    # is over the caps: the protocol cannot say "truncated", and a call that
    # failed must not have changed anything (a SELECT may write through a
    # function). Not in one: what cannot run in a transaction block, and a
    # plain read, which has nothing to undo (and saves two round trips).
    outside = runs_outside_transactions(shape)
    wrap = not (outside or plain_read(shape))
    if wrap:
        await command(held.conn, b"BEGIN")
    try:
        body, size = await run.statement(held, req, shape, run.max_bytes, run.timeout_ms)
    except BaseException:
        if wrap:
            await _rollback(held)
        raise
    too_large = size < 0
    if wrap:
        if too_large:
            await _rollback(held)
        else:
            await _commit(run, held)
    if too_large:
        if outside:
            raise run.too_large(
                "it ran outside a transaction (as PostgreSQL runs CALL, VACUUM and the "
                "like), so what it did stands"
            )
        if not wrap:
            raise run.too_large("it was a plain read, run as it is (nothing to roll back)")
        raise run.too_large()
    return body, size


async def _batch(run: _Call, held: Session, call: DriverCall) -> tuple[dict[str, Any], int]:
    """One transaction; the plan's timeout and byte cap hold for all its
    statements together."""
    assert call.batch is not None
    results = []
    left = run.max_bytes
    deadline = time.monotonic() + run.timeout_ms / 1000
    await command(held.conn, call.batch.begin(run.mode).encode())
    try:
        if run.mode == "ro" or call.batch.read_only:
            # Take the snapshot now: from then on no statement of the batch
            # can switch it to read-write (SET TRANSACTION READ WRITE must
            # come before any query).
            await command(held.conn, b"SELECT 1")
        for req, shape in zip(call.queries, run.shapes, strict=True):
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms < 1:
                raise DriverError(
                    f"canceling statement due to statement timeout ({run.timeout_ms} ms for "
                    "the call, the plan's)",
                    code="57014",
                )
            body, size = await run.statement(held, req, shape, left, remaining_ms)
            if size < 0:
                raise run.too_large()
            if held.conn.info.transaction_status != TransactionStatus.INTRANS:
                raise DriverError("a statement ended the transaction before its end", code="25000")
            left -= size
            results.append(body)
    except BaseException:
        await _rollback(held)
        raise
    await _commit(run, held)
    return {"results": results}, run.max_bytes - left


async def command(conn: psycopg.AsyncConnection[Any], text: bytes) -> None:
    """One of pgfleet's own commands (BEGIN, COMMIT, ROLLBACK): a single
    simple-protocol round trip, without a cursor (every call pays two)."""
    async with conn.lock:
        conn.pgconn.send_query(text)
        results = await conn.wait(execute_gen(conn.pgconn))
    for res in results:
        if res.status not in (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK):
            raise psycopg.errors.error_from_result(res, encoding=conn.info.encoding)


async def _commit(run: _Call, held: Session) -> None:
    try:
        await command(held.conn, b"COMMIT")
    except psycopg.Error as e:  # a serialization failure, a deferred constraint
        held.reusable = False
        if e.sqlstate is None:
            raise RegionUnavailable(
                f"region {run.endpoint.hosted_region} is unavailable: lost the connection "
                "to the project's server at commit",
                region=run.endpoint.hosted_region,
            ) from e
        raise from_postgres(e) from None


async def _rollback(held: Session) -> None:
    if held.conn.broken or held.conn.closed:
        held.reusable = False
        return
    try:
        await command(held.conn, b"ROLLBACK")
    except psycopg.Error:
        held.reusable = False
