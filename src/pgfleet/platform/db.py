"""The platform DB's connection pools, and what happens while it is away.

Every process keeps a sync pool (`PlatformDB`) and, in an API process, an
async one for the SQL API (`AsyncPlatformDB`); both share one `Breaker`.
When a connection cannot be had (the pool times out, or a connection breaks
under a query) the breaker opens: from then on callers get
`PlatformUnavailable` at once instead of each waiting out a pool timeout,
and one caller at a time, at most every `probe_interval_s`, tries a fresh
connection. When that works, the pool is replaced by a new one (psycopg's
pool backs off its reconnection attempts exponentially, which would keep
failing for a minute after the database is back) and the breaker closes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from pgfleet.errors import PlatformUnavailable

log = logging.getLogger(__name__)

MESSAGE = "the platform database cannot be reached; retry shortly"


class Breaker:
    """Whether the platform DB is known to be away. Thread-safe."""

    def __init__(self, probe_interval_s: float = 0.5) -> None:
        self.probe_interval_s = probe_interval_s
        self.down_since: float | None = None
        self._probing = False
        self._last_probe = 0.0
        self._lock = threading.Lock()
        self.generation = 0  # bumped at every recovery

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def trip(self, why: BaseException | str) -> None:
        with self._lock:
            if self.down_since is not None:
                return
            self.down_since = time.monotonic()
            self._last_probe = self.down_since
        log.warning("platform DB unreachable (%s); failing fast until it answers again", _why(why))

    def claim_probe(self) -> bool:
        """True for the one caller that should try the database now."""
        with self._lock:
            now = time.monotonic()
            if self._probing or now - self._last_probe < self.probe_interval_s:
                return False
            self._probing = True
            self._last_probe = now
            return True

    def answered(self) -> None:
        """Someone reached the database (a listener, a worker): it is back."""
        with self._lock:
            if self.down_since is None:
                return
            away = time.monotonic() - self.down_since
            self.down_since = None
            self.generation += 1
        log.warning("platform DB answers again (after %.1f s)", away)

    def probe_done(self, ok: bool) -> None:
        with self._lock:
            self._probing = False
            if ok and self.down_since is not None:
                away = time.monotonic() - self.down_since
                self.down_since = None
                self.generation += 1
                log.warning("platform DB answers again (after %.1f s)", away)


def _why(e: BaseException | str) -> str:
    if isinstance(e, str):
        return e
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _probe_conninfo(conninfo: dict[str, Any]) -> dict[str, Any]:
    return {**conninfo, "connect_timeout": 2, "application_name": "pgfleet-probe-platform"}


class PlatformDB:
    """A sync pool on the platform DB that fails fast while it is away and
    starts afresh when it is back. `connection()` is all callers use."""

    def __init__(
        self,
        conninfo: dict[str, Any],
        *,
        breaker: Breaker,
        make_pool: Callable[[], ConnectionPool],
    ) -> None:
        self.conninfo = conninfo
        self.breaker = breaker
        self._make_pool = make_pool
        self._pool = make_pool()
        self._generation = breaker.generation
        self._lock = threading.Lock()

    @property
    def pool(self) -> ConnectionPool:
        return self._pool

    def _admit(self) -> None:
        """Fail fast while the database is away; let one caller at a time
        find out whether it is back."""
        if not self.breaker.down:
            if self._generation != self.breaker.generation:
                self._renew()  # another pool of this process saw it come back
            return
        if not self.breaker.claim_probe():
            raise PlatformUnavailable(MESSAGE)
        ok = False
        try:
            psycopg.connect(**_probe_conninfo(self.conninfo)).close()
            ok = True
        except psycopg.Error as e:
            raise PlatformUnavailable(MESSAGE) from e
        finally:
            self.breaker.probe_done(ok)
        self._renew()

    def _diagnose(self, e: BaseException) -> None:
        """A connection could not be had or broke: is the database away, or
        was it only this connection (ended by someone, a full pool)?"""
        if self.breaker.down:
            return
        try:
            psycopg.connect(**_probe_conninfo(self.conninfo)).close()
        except psycopg.Error:
            self.breaker.trip(e)

    def _renew(self) -> None:
        with self._lock:
            if self._generation == self.breaker.generation:
                return
            old, self._pool = self._pool, self._make_pool()
            self._generation = self.breaker.generation
        threading.Thread(target=old.close, kwargs={"timeout": 0}, daemon=True).start()

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[psycopg.Connection[Any]]:
        self._admit()
        pool = self._pool
        try:
            cm = pool.connection(timeout=timeout)
            conn = cm.__enter__()
        except (PoolTimeout, psycopg.OperationalError) as e:
            self._diagnose(e)
            raise PlatformUnavailable(MESSAGE) from e
        try:
            yield conn
        except psycopg.OperationalError as e:
            cm.__exit__(type(e), e, e.__traceback__)
            if not conn.broken:
                raise  # a query cancelled or timed out: not an outage
            self._diagnose(e)
            raise PlatformUnavailable(MESSAGE) from e
        except BaseException as e:
            cm.__exit__(type(e), e, e.__traceback__)
            raise
        else:
            cm.__exit__(None, None, None)

    def close(self, timeout: float = 2.0) -> None:
        self._pool.close(timeout=timeout)


class AsyncPlatformDB:
    """The async twin of PlatformDB, for the SQL API's event loop."""

    def __init__(
        self,
        conninfo: dict[str, Any],
        *,
        breaker: Breaker,
        make_pool: Callable[[], AsyncConnectionPool],
    ) -> None:
        self.conninfo = conninfo
        self.breaker = breaker
        self._make_pool = make_pool
        self._pool: AsyncConnectionPool | None = None
        self._generation = breaker.generation

    async def open(self) -> None:
        self._pool = self._make_pool()
        await self._pool.open(wait=False)

    @property
    def pool(self) -> AsyncConnectionPool:
        if self._pool is None:
            raise RuntimeError("the pool is not open")
        return self._pool

    async def _admit(self) -> None:
        if not self.breaker.down:
            if self._generation != self.breaker.generation:
                await self._renew()
            return
        if not self.breaker.claim_probe():
            raise PlatformUnavailable(MESSAGE)
        ok = False
        try:
            conn = await psycopg.AsyncConnection.connect(**_probe_conninfo(self.conninfo))
            await conn.close()
            ok = True
        except psycopg.Error as e:
            raise PlatformUnavailable(MESSAGE) from e
        finally:
            self.breaker.probe_done(ok)
        await self._renew()

    async def _diagnose(self, e: BaseException) -> None:
        if self.breaker.down:
            return
        try:
            conn = await psycopg.AsyncConnection.connect(**_probe_conninfo(self.conninfo))
            await conn.close()
        except psycopg.Error:
            self.breaker.trip(e)

    async def _renew(self) -> None:
        if self._generation == self.breaker.generation:
            return
        old, self._pool = self._pool, self._make_pool()
        self._generation = self.breaker.generation
        await self._pool.open(wait=False)
        if old is not None:
            await old.close(timeout=0)

    @asynccontextmanager
    async def connection(
        self, timeout: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        await self._admit()
        try:
            cm = self.pool.connection(timeout=timeout)
            conn = await cm.__aenter__()
        except (PoolTimeout, psycopg.OperationalError) as e:
            await self._diagnose(e)
            raise PlatformUnavailable(MESSAGE) from e
        try:
            yield conn
        except psycopg.OperationalError as e:
            await cm.__aexit__(type(e), e, e.__traceback__)
            if not conn.broken:
                raise
            await self._diagnose(e)
            raise PlatformUnavailable(MESSAGE) from e
        except BaseException as e:
            await cm.__aexit__(type(e), e, e.__traceback__)
            raise
        else:
            await cm.__aexit__(None, None, None)

    async def close(self, timeout: float = 1.0) -> None:
        if self._pool is not None:
            await self._pool.close(timeout=timeout)
