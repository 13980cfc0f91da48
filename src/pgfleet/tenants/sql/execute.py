"""Running one statement on a session of the project's role: a timer that
cancels it from outside at the call's timeout (and ends the session a
second later if the statement swallowed the cancel), rows streamed and
converted until the caps, a write always read to its end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, cast

import psycopg

from pgfleet.tenants.sql.limits import SqlRequest, SqlResult, first_word
from pgfleet.tenants.sql.values import (
    Oversized,
    StatementCursor,
    fields_of,
    to_json,
    type_names,
)


class TimedOut(Exception):
    """The statement ignored its cancel and its session had to be ended."""


class Unanswered(Exception):
    """The server answered neither the statement, nor its cancel, nor the
    end of its session (it is frozen, or its host is): the call gave up."""


# Statements that only read: when their rows pass the caps, the rest are not
# read (the statement is cancelled). Anything else (INSERT ... RETURNING, a
# data-modifying WITH) is read to its end, so a truncated answer never hides
# a write that was rolled back.
_READS = frozenset({"select", "values", "table", "show", "explain", "fetch"})


_WRITES = re.compile(r"\b(insert|update|delete|merge)\b")


TERMINATE_GRACE_S = 1.0
# After the session's end was asked for: how long before the call gives up
# on a server that answers nothing, and cuts its connection.
UNANSWERED_S = 4.0


def _sever(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Shut the connection's socket down under libpq, so the read it waits
    on ends at once (EOF) and psycopg fails the statement with the
    connection broken. Whether that could be done.

    Cancelling the call's task instead makes psycopg send a cancel of its
    own first and wait for the answer: up to 10 s more on a server that
    answers nothing."""
    try:
        fd = conn.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as sock:  # a duplicate: libpq keeps its fd
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error):
        return False
    return True


_INLINE_ROWS = 500  # rows converted on the event loop; beyond, in a thread


def _to_rows(raw: list[Any]) -> list[tuple[list[Any], int]]:
    out = []
    for r in raw:
        row = [to_json(v) for v in r]
        out.append((row, len(json.dumps(row, default=str))))
    return out


def _text_rows(raw: list[Any]) -> list[tuple[list[Any], int]]:
    """Rows already as text (the HTTP driver's): their size, about as JSON."""
    return [(r, sum(4 if v is None else len(v) + 3 for v in r) + 2) for r in raw]


def is_read(shape: str) -> bool:
    """Does a statement of this shape only read?"""
    first = first_word(shape)
    return first in _READS or (first == "with" and not _WRITES.search(shape))


async def execute(
    conn: psycopg.AsyncConnection[Any],
    tenant_id: uuid.UUID,
    req: SqlRequest,
    shape: str,
    mode: str,
    timeout_ms: int,
    max_rows: int,
    max_bytes: int,
    terminate: Callable[[int], Coroutine[Any, Any, None]],
    *,
    text: bool = False,
) -> tuple[SqlResult, bool]:
    """The statement's result, and whether its connection may be reused.
    With `text`, values are PostgreSQL's text and `columns` the HTTP
    driver's field descriptions. Raises TimedOut, or Unanswered if the
    server answers nothing at all past the timeout (the connection is then
    not to be reused)."""
    caller = asyncio.current_task()
    gave_up = False

    def give_up() -> None:
        nonlocal gave_up
        gave_up = True
        if not _sever(conn) and caller is not None:
            caller.cancel()

    async def statement() -> tuple[SqlResult, bool]:
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
        reads = is_read(shape)
        convert = _text_rows if text else _to_rows
        clean = False
        try:
            async with StatementCursor(conn) as cur:
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

                # rows() always uses the extended protocol, which runs exactly one
                # statement, and lets us stop reading at the caps. A row whose raw
                # text is over twice the byte cap is not even loaded: its JSON
                # (at least half its raw size, a bytea's base64 being the
                # smallest) cannot fit.
                stream = cast(
                    AsyncGenerator[Any, None],
                    cur.rows(
                        req.query,
                        list(req.params),
                        size=min(max_rows + 1, 1000),
                        max_raw_row=2 * max_bytes,
                        text=text,
                    ),
                )
                try:
                    async with contextlib.aclosing(stream):
                        async for raw in stream:
                            seen += 1
                            if truncated:
                                continue  # a write: read to its end, keep nothing
                            if isinstance(raw, Oversized):
                                if batch:
                                    take(await asyncio.to_thread(convert, batch))
                                    batch = []
                                truncated = True
                            elif seen <= _INLINE_ROWS:
                                take(convert([raw]))
                            else:
                                # A large result: convert in a thread, so other
                                # requests on this loop are not held up.
                                batch.append(raw)
                                if len(batch) >= _INLINE_ROWS:
                                    take(await asyncio.to_thread(convert, batch))
                                    batch = []
                            if truncated and reads:
                                break
                        if batch and not truncated:
                            take(await asyncio.to_thread(convert, batch))
                except psycopg.Error:
                    if gave_up:
                        raise Unanswered() from None
                    if terminated:
                        raise TimedOut() from None
                    raise
                for t in timers:
                    t.cancel()
                # Wait out a cancel sent as the statement ended before the next
                # query, so it cannot land on that one; the statement stands.
                for task in pending:
                    with contextlib.suppress(Exception):
                        await task
                if terminated:
                    raise TimedOut()
                if text:
                    columns: list[dict[str, Any]] = fields_of(cur.pgresult)
                elif cur.description is not None:
                    columns = await type_names(conn, tenant_id, cur.description)
                else:
                    columns = []
                final = cur.final
                command = (final.command_status or b"").decode() if final is not None else ""
                if not command:  # libpq leaves the tag empty after chunked rows
                    command = first_word(shape).upper()
                if cur.description is not None:
                    # Rows: the tag's words without its counts, whatever path
                    # the rows took (row_count counts them).
                    command = " ".join(w for w in command.split() if not w.isdigit())
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

    handle = asyncio.get_running_loop().call_later(
        timeout_ms / 1000 + TERMINATE_GRACE_S + UNANSWERED_S, give_up
    )
    try:
        return await statement()
    except psycopg.Error:
        if gave_up:  # the cut connection, anywhere past the rows
            raise Unanswered() from None
        raise
    except asyncio.CancelledError:
        if gave_up and caller is not None and caller.uncancel() == 0:
            raise Unanswered() from None
        raise
    finally:
        handle.cancel()
