"""Pool callbacks shared by every connection pool pgfleet keeps."""

from __future__ import annotations

import select
import time
import weakref
from contextlib import AbstractContextManager
from typing import Any, Protocol

import psycopg
from psycopg_pool import ConnectionPool

_returned_at: weakref.WeakKeyDictionary[
    psycopg.Connection[Any] | psycopg.AsyncConnection[Any], float
] = weakref.WeakKeyDictionary()


def mark_returned(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    _returned_at[conn] = time.monotonic()


def is_suspect(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether a pooled connection needs a ping before use. An idle
    connection has nothing to read, so if its socket is readable the server
    said something (a restart's FATAL, an EOF); connections that sat idle for
    a while are pinged too. Raises if it is known to be broken."""
    if conn.broken or conn.closed:
        raise psycopg.OperationalError("the pooled connection is broken")
    # poll, not select: select() cannot take descriptors past 1023.
    poller = select.poll()
    poller.register(conn.pgconn.socket, select.POLLIN)
    readable = poller.poll(0)
    return bool(readable) or time.monotonic() - _returned_at.get(conn, 0.0) > 30.0


def check_pooled(conn: psycopg.Connection[Any]) -> None:
    """Pool check without a round trip on the hot path (see is_suspect)."""
    if is_suspect(conn):
        ConnectionPool.check_connection(conn)


class ConnectionSource(Protocol):
    """Anything that lends connections (a psycopg pool, the platform DB)."""

    def connection(
        self, timeout: float | None = None
    ) -> AbstractContextManager[psycopg.Connection[Any]]: ...
