"""Pool callbacks shared by every connection pool pgfleet keeps."""

from __future__ import annotations

import asyncio
import logging
import select
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

log = logging.getLogger(__name__)

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


class _Sweep:
    """The check of a pool that, once it finds one idle connection dead,
    has the pool check all its idle connections at once in the background.

    When one is dead the others usually are too (the server restarted, or
    someone ended every backend), and psycopg_pool alone would find them
    one per attempt, waiting 1 s, 2 s, 4 s... in between: a caller then
    times out on a pool full of corpses while the server is fine."""

    def __init__(self) -> None:
        self.pool: ConnectionPool | None = None
        self._lock = threading.Lock()
        self._running = False

    def __call__(self, conn: psycopg.Connection[Any]) -> None:
        try:
            check_pooled(conn)
        except Exception:
            self._start()
            raise

    def _start(self) -> None:
        with self._lock:
            if self._running or self.pool is None:
                return
            self._running = True
        threading.Thread(target=self._run, name="pool-sweep", daemon=True).start()

    def _run(self) -> None:
        try:
            if self.pool is not None and not self.pool.closed:
                self.pool.check()
        except Exception as e:  # the pool closed under us: nothing to sweep
            log.debug("pool sweep stopped: %s", e)
        finally:
            with self._lock:
                self._running = False


class _MarkingPool(ConnectionPool):
    """Marks each connection's return (see is_suspect) in the thread that
    returns it. A `reset` callback could, but psycopg_pool hands every return
    of a pool with one to a worker thread (a queue put and a thread woken per
    use: 4% of an API process's CPU in bench/provision.py's profile)."""

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        mark_returned(conn)
        super().putconn(conn)


class _AsyncMarkingPool(AsyncConnectionPool):
    """_MarkingPool for an AsyncConnectionPool. It also keeps why its last
    login failed (`last_login_error`, None once one succeeds): a caller whose
    wait ran out can tell a server that answers no login in time from one
    that refuses it."""

    last_login_error: psycopg.OperationalError | None = None
    last_login_failed_at = 0.0  # time.monotonic() of that failure

    async def putconn(self, conn: psycopg.AsyncConnection[Any]) -> None:
        mark_returned(conn)
        await super().putconn(conn)


def _fresh(configure: Callable[[Any], None] | None) -> Callable[[Any], None]:
    """The pool's `configure`, preceded by marking the connection as just
    returned: a login that has just succeeded needs no ping before its first
    use (unmarked, it counted as idle since forever: one more round trip, and
    one more statement on the server, for every new connection)."""

    def conf(conn: Any) -> None:
        mark_returned(conn)
        if configure is not None:
            configure(conn)

    return conf


def swept_pool(*, open: bool = True, **kwargs: Any) -> ConnectionPool:
    """A ConnectionPool checked by check_pooled that sweeps out all its dead
    connections as soon as it meets one (see _Sweep), and marks each
    connection's login and return (no `reset` needed for that)."""
    sweep = _Sweep()
    kwargs["configure"] = _fresh(kwargs.get("configure"))
    pool: ConnectionPool = _MarkingPool(check=sweep, open=False, **kwargs)
    sweep.pool = pool
    if open:
        pool.open()
    return pool


class _AsyncSweep:
    """_Sweep for an AsyncConnectionPool."""

    def __init__(self) -> None:
        self.pool: AsyncConnectionPool | None = None
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            if is_suspect(conn):
                await AsyncConnectionPool.check_connection(conn)
        except Exception:
            if self.pool is not None and (self._task is None or self._task.done()):
                self._task = asyncio.get_running_loop().create_task(self._run(self.pool))
            raise

    @staticmethod
    async def _run(pool: AsyncConnectionPool) -> None:
        try:
            if not pool.closed:
                await pool.check()
        except Exception as e:
            log.debug("pool sweep stopped: %s", e)


def swept_async_pool(**kwargs: Any) -> AsyncConnectionPool:
    """The async twin of swept_pool; the pool is returned unopened."""
    sweep = _AsyncSweep()
    configure = kwargs.get("configure")
    base: type[psycopg.AsyncConnection[Any]] = kwargs.get(
        "connection_class", psycopg.AsyncConnection
    )

    class Noted(base):  # type: ignore[valid-type,misc]
        """Its pool's logins, each failure noted on the pool (the pool's
        connect retries keep only a count)."""

        @classmethod
        async def connect(cls, *args: Any, **kw: Any) -> Any:
            try:
                conn = await super().connect(*args, **kw)
            except psycopg.OperationalError as e:
                pool.last_login_error = e
                pool.last_login_failed_at = time.monotonic()
                raise
            pool.last_login_error = None
            return conn

    async def conf(conn: psycopg.AsyncConnection[Any]) -> None:
        mark_returned(conn)  # see _fresh
        if configure is not None:
            await configure(conn)

    kwargs["configure"] = conf
    kwargs["connection_class"] = Noted
    pool = _AsyncMarkingPool(check=sweep, open=False, **kwargs)
    sweep.pool = pool
    return pool


def login_timed_out(error: BaseException | None) -> bool:
    """Whether a failed login got no answer in time (libpq's connect_timeout):
    the server accepts connections and serves none (frozen, or overwhelmed)."""
    return isinstance(error, psycopg.OperationalError) and "timeout expired" in str(error)


def last_login_error(
    pool: AsyncConnectionPool, since: float = 0.0
) -> psycopg.OperationalError | None:
    """Why a swept_async_pool's last login failed, if it failed after
    `since` (a time.monotonic()); None if it succeeded, or none was tried."""
    if getattr(pool, "last_login_failed_at", 0.0) < since:
        return None
    return getattr(pool, "last_login_error", None)


class ConnectionSource(Protocol):
    """Anything that lends connections (a psycopg pool, the platform DB)."""

    def connection(
        self, timeout: float | None = None
    ) -> AbstractContextManager[psycopg.Connection[Any]]: ...
