"""Pool callbacks shared by every connection pool pgfleet keeps."""

from __future__ import annotations

import select
import time
import weakref
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

_returned_at: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = (
    weakref.WeakKeyDictionary()
)


def mark_returned(conn: psycopg.Connection[Any]) -> None:
    _returned_at[conn] = time.monotonic()


def check_pooled(conn: psycopg.Connection[Any]) -> None:
    """Pool check without a round trip on the hot path: an idle connection
    has nothing to read, so if its socket is readable the server said
    something (a restart's FATAL, an EOF) and only then it is pinged; so are
    connections that sat idle for a while."""
    if conn.broken or conn.closed:
        raise psycopg.OperationalError("the pooled connection is broken")
    readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    if readable or time.monotonic() - _returned_at.get(conn, 0.0) > 30.0:
        ConnectionPool.check_connection(conn)
