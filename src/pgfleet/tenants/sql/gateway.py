"""Running SQL for a project: logged in as the project's own role, one
statement per call, with timeouts and result caps enforced by pgfleet.

The SQL API's whole path runs on the API's event loop (`SqlGateway`): the
token and project in one platform round trip (or none: see auth.AuthCache),
the statement on a connection of the project's role (pooled once the
project comes back; see below), no thread hops.
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
- Pools only for projects that come back: a (project, mode) gets a pool
  when its previous statement came within the last 2 x
  PGFLEET_TENANT_POOL_CAP (per process) others', about when its pool would
  still be there for the next one. Any other statement logs in, runs and
  logs out. Keeping
  its backend idle until the least recently used pool made way would only
  cost: with 1,000 projects round-robin, no pool is ever used twice, and
  64 idle backends held that way cost the server 23% more CPU per login
  than closing each at once (measured; see README, Tests and benchmarks).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import struct
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pgfleet.errors import (
    Conflict,
    InvalidInput,
    PgfleetError,
    ProjectNotFound,
    RegionUnavailable,
    SqlError,
    TooManyStatements,
    read_only_refusal,
)
from pgfleet.monitoring.fingerprint import fingerprint
from pgfleet.monitoring.querylog import QueryLogWriter
from pgfleet.platform.core import Platform
from pgfleet.platform.db import AsyncPlatformDB
from pgfleet.platform.owners import Owner
from pgfleet.pooling import last_login_error, login_timed_out, mark_returned, swept_async_pool
from pgfleet.regions import get_plan
from pgfleet.tenants.connections import (
    DatabasePlatformClient,
    Mode,
    PoolCache,
    PoolEntry,
    TenantEndpoint,
    check_mode,
    refusal,
)
from pgfleet.tenants.sql.auth import AUTH_CHANNEL, AuthCache, authenticate_with_project_async
from pgfleet.tenants.sql.execute import TimedOut, Unanswered, execute
from pgfleet.tenants.sql.limits import (
    SqlRequest,
    SqlResult,
    check_request,
    plan_limits,
    refuse_unsupported,
)
from pgfleet.tenants.sql.values import configure_loaders

log = logging.getLogger(__name__)
# How long knocking on a server known to be unreachable may take.
PROBE_S = 0.5
# A server this process logged in to this recently is not knocked at before
# a new pool's first login (a knock costs the server a fork).
REACHED_S = 5.0
# The 8 bytes a client sends to ask a server for TLS: answered at once by
# a server that works, before any login.
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
# How long ending a session that ignored its cancel may take.
TERMINATE_WAIT_S = 3.0


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
        then = (
            f" (resume it first: `pgfleet projects resume {row['id']}`)"
            if row["status"] == "paused"
            else ""
        )
        raise Conflict(
            f"project {row['id']} is {row['status']}; SQL runs only on active projects{then}",
            status=row["status"],
        )
    return row


def _only_waited(pool: AsyncConnectionPool) -> bool:
    """Whether a wait for one of the pool's connections that ran out met only
    busy connections: the pool holds some and none of its logins failed.
    (The last running statement may hand its connection back just as the
    wait ends: nothing then is checked out, and yet no login was refused.)"""
    stats = pool.get_stats()
    return stats.get("connections_errors", 0) == 0 and stats.get("pool_size", 0) > 0


async def _close(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.close()


async def _reset(conn: psycopg.AsyncConnection[Any]) -> None:
    """Whatever the last statement SET (timeouts, temp tables, advisory
    locks, LISTEN), the next one starts clean."""
    await conn.execute("DISCARD ALL")
    mark_returned(conn)


class _Resets:
    """A pool's `reset` callback (see _reset) that keeps when each of the
    pool's sessions began a reset that has not ended yet."""

    def __init__(self) -> None:
        self._began: dict[int, float] = {}

    async def __call__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        key = id(conn)
        self._began[key] = time.monotonic()
        try:
            await _reset(conn)
        finally:
            self._began.pop(key, None)

    def before(self, moment: float) -> bool:
        """Whether a reset still going began before `moment`."""
        return any(began < moment for began in self._began.values())

    def age(self) -> float:
        """How long the oldest reset still going has run (0 if none)."""
        return time.monotonic() - min(self._began.values(), default=time.monotonic())


@dataclass
class Session:
    conn: psycopg.AsyncConnection[Any]
    reusable: bool = False


@dataclass(frozen=True)
class Unpooled:
    """Where a connection without a pool came from: (project, mode)."""

    key: tuple[uuid.UUID, Mode]


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
        # Servers being asked whether they answer at all (see _answers).
        self._asking: dict[int, asyncio.Future[bool]] = {}
        # Each pool's resets under way (see _Resets).
        self._resets: weakref.WeakKeyDictionary[AsyncConnectionPool, _Resets] = (
            weakref.WeakKeyDictionary()
        )
        self._background: set[asyncio.Task[Any]] = set()
        # Servers the last connection attempt found unreachable: the next
        # request knocks (a TCP connect, PROBE_S at most) before it waits out
        # a connect timeout and a diagnosis again.
        self._unreachable: set[int] = set()
        # When a new pool's first login last succeeded, per server.
        self._reached: dict[int, float] = {}
        self.auth_cache = AuthCache()
        # The HTTP driver's verified logins, dropped on the same notices.
        self.driver_cache = AuthCache()
        self._listener: asyncio.Task[None] | None = None
        self.listen_retry_s = 1.0
        # The (project, mode)s of the last statements, the most recent last,
        # twice as many as pools are kept: one seen here gets a pool (_admit).
        self._seen: OrderedDict[tuple[uuid.UUID, Mode], None] = OrderedDict()
        # Connections without a pool in use, per (project, mode): they count
        # toward the project's most statements at once, as a pool's do.
        self._unpooled: dict[tuple[uuid.UUID, Mode], int] = {}
        # Set (and replaced) when a connection goes back while statements
        # wait for room beside a connection of its own (_room_for).
        self._room = asyncio.Event()
        self._room_waiters = 0

    async def open(self) -> None:
        s = self.platform.settings

        def make_pool() -> AsyncConnectionPool:
            return swept_async_pool(
                kwargs={
                    **self.platform.conninfo,
                    "application_name": "pgfleet",
                    "autocommit": True,
                },
                min_size=1,
                max_size=16,
                timeout=s.connect_timeout_s,
                name="platform-sql",
            )

        self._db = AsyncPlatformDB(
            self.platform.conninfo, breaker=self.platform.breaker, make_pool=make_pool
        )
        await self._db.open()
        self.platform.pool_counters.append(self.pool_count)
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        """Keep a LISTEN on the auth channel; the caches are live only while it is."""
        caches = (self.auth_cache, self.driver_cache)
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
                    for cache in caches:
                        cache.clear()
                        cache.live = True
                    async for notice in conn.notifies():
                        for cache in caches:
                            cache.invalidate(notice.payload)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # whatever it was, retry; the cache is off meanwhile
                if not failing:  # once per state change, not once a second
                    log.warning("auth cache off: %s", e.__class__.__name__)
                failing = True
            finally:
                for cache in caches:
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
        if owner.read_only and mode != "ro":
            raise read_only_refusal("SQL runs with mode ro only")
        limits = plan_limits(project["plan_type"])
        timeout_ms, max_rows = check_request(req, limits)
        shape = fingerprint(req.query)
        refuse_unsupported(shape)
        tid = project["id"]
        endpoint = DatabasePlatformClient.of(self.platform).endpoint_from_row(project)
        started_at = dt.datetime.now(dt.UTC)
        t0 = time.perf_counter()
        outcome = "error"
        row_count: int | None = None
        try:
            entry, conn = await self._connect(endpoint, mode, project["plan_type"])
            reusable = False
            try:
                result, reusable = await execute(
                    conn,
                    tid,
                    req,
                    shape,
                    mode,
                    timeout_ms,
                    max_rows,
                    limits["max_bytes"],
                    lambda pid: self.terminate(endpoint, pid),
                )
            finally:
                await self._give_back(entry, conn, reusable)
            row_count = result.row_count
            outcome = "ok"
        except Unanswered:
            outcome = "08006"
            raise RegionUnavailable(
                f"region {endpoint.hosted_region} is unavailable: the project's server "
                f"answered neither the statement nor its cancel (timeout_ms={timeout_ms})",
                region=endpoint.hosted_region,
            ) from None
        except TimedOut:
            outcome = "57014"
            raise SqlError(
                f"statement canceled: it ran longer than timeout_ms={timeout_ms}",
                sqlstate="57014",
                position=None,
                detail="it ignored the cancel request, so its session was ended",
                hint=None,
            ) from None
        except psycopg.Error as e:
            if e.sqlstate is None and not conn.broken:
                # psycopg refused it before sending (a value PostgreSQL cannot
                # take): the request's fault, and the session is fine.
                outcome = "invalid_input"
                raise InvalidInput(f"the statement was not sent: {e}", field="params") from None
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
            hint = diag.message_hint
            if outcome == "57014":
                message = f"statement canceled: it ran longer than timeout_ms={timeout_ms}"
            elif outcome == "42601" and "multiple commands" in message:
                # The extended protocol's refusal of "a; b", in words.
                message = "the query holds more than one statement"
                hint = (
                    "the SQL API runs one statement per request (so that $1, $2... are "
                    "parameters, never text): send them one at a time"
                )
            raise SqlError(
                message,
                sqlstate=e.sqlstate,
                position=int(diag.statement_position) if diag.statement_position else None,
                detail=diag.message_detail,
                hint=hint,
            ) from None
        except PgfleetError as e:
            outcome = e.code
            raise
        finally:
            elapsed = (time.perf_counter() - t0) * 1000
            self.record(endpoint, mode, outcome, elapsed, row_count, shape, started_at)
        result.duration_ms = round(elapsed, 3)
        result.limits = {
            "timeout_ms": timeout_ms,
            "max_rows": max_rows,
            "max_bytes": limits["max_bytes"],
            "plan_max_timeout_ms": limits["max_timeout_ms"],
            "plan_max_rows": limits["max_rows"],
        }
        return result

    @contextlib.asynccontextmanager
    async def session(
        self, endpoint: TenantEndpoint, mode: Mode, plan_type: str | None
    ) -> AsyncIterator[Session]:
        """A pooled connection of the project's `mode` role, for several
        statements (the HTTP driver's transaction); it goes back to its pool
        reset, or is closed unless `reusable` was set."""
        entry, conn = await self._connect(endpoint, mode, plan_type)
        held = Session(conn)
        try:
            yield held
        finally:
            await self._give_back(entry, conn, held.reusable)

    def record(
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
        QueryLogWriter.of(self.platform).log(
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

    def _host(self, endpoint: TenantEndpoint) -> str:
        """Where to log in: an embedded server's Unix socket (no TLS
        handshake per login; see Platform.local_socket_dir), else its
        address, over TLS."""
        where = self.platform.local_socket_dir(endpoint.host, endpoint.port)
        if where is None or not os.path.exists(f"{where}/.s.PGSQL.{endpoint.port}"):
            return endpoint.host  # not on this host, or not running: TCP says which
        return where

    def _make_pool(self, endpoint: TenantEndpoint, mode: Mode, size: int) -> AsyncConnectionPool:
        s = self.platform.settings
        resets = _Resets()
        pool = swept_async_pool(
            kwargs={
                **endpoint.conninfo(mode, s.connect_timeout_s),
                "host": self._host(endpoint),
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
            configure=configure_loaders,
            reset=resets,
            name=f"{endpoint.database}-{mode}-sql",
        )
        self._resets[pool] = resets
        return pool

    @staticmethod
    def _unreachable_error(endpoint: TenantEndpoint) -> RegionUnavailable:
        return RegionUnavailable(
            f"region {endpoint.hosted_region} is unavailable: the project's server "
            "cannot be reached",
            region=endpoint.hosted_region,
        )

    @contextlib.asynccontextmanager
    async def _opened(
        self, endpoint: TenantEndpoint
    ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]:
        """A connection to the project's server (its Unix socket, or its
        address), opened within PROBE_S, or None; closed after."""
        host = self._host(endpoint)
        opening = (
            asyncio.open_unix_connection(f"{host}/.s.PGSQL.{endpoint.port}")
            if host.startswith("/")
            else asyncio.open_connection(host, endpoint.port)
        )
        try:
            reader, writer = await asyncio.wait_for(opening, timeout=PROBE_S)
        except (OSError, TimeoutError):
            yield None
            return
        try:
            yield reader, writer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _knock(self, endpoint: TenantEndpoint) -> bool:
        """Does the project's server accept a connection at all?"""
        async with self._opened(endpoint) as opened:
            return opened is not None

    def _recently_reached(self, endpoint: TenantEndpoint) -> bool:
        """Whether a login on the project's server succeeded in the last
        REACHED_S (then a first login does not knock first)."""
        reached = self._reached.get(endpoint.server_id)
        return reached is not None and time.monotonic() - reached < REACHED_S

    def _gone(self, endpoint: TenantEndpoint) -> RegionUnavailable:
        """The project's server is unreachable: the next request knocks
        before it logs in there. The error that says so."""
        self._unreachable.add(endpoint.server_id)
        self._reached.pop(endpoint.server_id, None)
        return self._unreachable_error(endpoint)

    def _admit(self, key: tuple[uuid.UUID, Mode]) -> bool:
        """Whether (project, mode) gets a pool: it has one, or its last
        statement was among the last 2 x cap (see the module's docstring)."""
        seen = key in self._seen or self._pools.holds(*key)
        # Kept in the window while it has a pool too: once the pool is
        # evicted, a project that keeps coming back gets a new one at once.
        self._seen[key] = None
        self._seen.move_to_end(key)
        # Twice the pools kept: a pool in use is never evicted, so the cache
        # runs past its cap under load, and a project that would still
        # find its pool must not be refused one.
        window = 2 * self.platform.settings.tenant_pool_cap_per_process
        while len(self._seen) > window:
            self._seen.popitem(last=False)
        return seen

    async def _connect(
        self, endpoint: TenantEndpoint, mode: Mode, plan_type: str | None
    ) -> tuple[PoolEntry[AsyncConnectionPool] | Unpooled, psycopg.AsyncConnection[Any]]:
        """A connection of the project's `mode` role, and the pool entry it
        came from (or Unpooled: a connection of its own, closed after use)."""
        if endpoint.server_id in self._unreachable:
            if not await self._knock(endpoint):
                raise self._unreachable_error(endpoint)
            self._unreachable.discard(endpoint.server_id)
        size = self.pool_size(plan_type)
        key = (endpoint.tenant_id, mode)
        unpooled = self._unpooled.get(key, 0)
        asked = time.monotonic()
        if not self._admit(key):
            conn = await self._connect_unpooled(endpoint, mode, plan_type, key, size)
            return Unpooled(key), conn
        entry, stale = self._pools.take(
            endpoint, mode, lambda: self._make_pool(endpoint, mode, size), size
        )
        for pool in stale:
            self._spawn(pool.close(timeout=5))
        try:
            wait = None
            fresh = entry.pool.closed
            recent = False
            if fresh:
                # Its first connection gets a second attempt (the pool retries
                # a failed one after about a second): one login slowed past
                # connect_timeout by a loaded host is not an outage. A server
                # that refuses connections is one, and is said at once: a
                # knock asks first, unless a login there just succeeded; then
                # only a first login that takes longer than PROBE_S knocks.
                recent = self._recently_reached(endpoint)
                if not recent and not await self._knock(endpoint):
                    raise self._gone(endpoint)
                # Opened on first use, on this loop; open() is idempotent.
                await entry.pool.open(wait=False)
            if not entry.served:
                # Whoever waits on a pool's first login waits as long as it
                # may take, not only the statement that opened the pool: a
                # shorter wait would run out before the login's outcome
                # (then taken for a busy project, on a frozen server).
                wait = 2 * self.platform.settings.connect_timeout_s + 1.5
            if unpooled:
                await self._room_for(key, entry, size)
            entry.pending += 1
            try:
                if recent:
                    conn = await self._first_login(
                        endpoint, entry.pool.getconn(timeout=wait), entry.pool.putconn
                    )
                else:
                    conn = await entry.pool.getconn(timeout=wait)
            finally:
                entry.pending -= 1
            if fresh:
                self._reached[endpoint.server_id] = time.monotonic()
            entry.served = True
            entry.checked_out += 1
            return entry, conn
        except (PoolTimeout, psycopg.OperationalError) as e:
            self._pools.give_back(entry)
            if login_timed_out(last_login_error(entry.pool, since=asked)):
                # Logins there got no answer in time while this waited (see
                # _connect_unpooled), however busy the project also is. A
                # pool with sessions in use keeps them: they may still work.
                if not entry.checked_out:
                    self._pools.discard(entry)
                    self._spawn(entry.pool.close(timeout=5))
                raise self._gone(endpoint) from e
            resets = self._resets.get(entry.pool)
            if isinstance(e, PoolTimeout) and resets is not None and resets.before(asked):
                # A session's reset (DISCARD ALL) that began before this
                # wait, and is still on its way after all of it (the waits
                # of a busy project meet resets that began after them): the
                # server answers nothing (its host paused, say), or the
                # reset waits on a lock the project's own session holds
                # (it drops the session's temporary tables, and one that
                # inherits from a table waits for that table's lock). The
                # server says which, by answering a login or not.
                age = resets.age()
                if not await self._answers(endpoint):
                    self._gone(endpoint)
                    raise RegionUnavailable(
                        f"region {endpoint.hosted_region} is unavailable: the project's "
                        "server has not answered a pooled session's reset (DISCARD ALL) for "
                        f"{age:.1f} s, nor a new connection",
                        region=endpoint.hosted_region,
                    ) from e
                raise TooManyStatements(
                    f"project {endpoint.tenant_id} has all its {size} {mode} connections of "
                    f"this API process in use, one of them in a reset (DISCARD ALL) for "
                    f"{age:.1f} s: it drops the session's temporary tables, and one that "
                    "inherits from a table waits while another session holds a lock on that "
                    "table; retry when it is done",
                    limit=size,
                ) from None
            own = self._unpooled.get(key, 0)  # now, not when this one came
            if isinstance(e, PoolTimeout) and (
                entry.checked_out + own > 0 or _only_waited(entry.pool)
            ):
                raise self._busy(endpoint, mode, size) from None
            # Retry afresh next time, without the pool's reconnection backoff.
            self._pools.discard(entry)
            self._spawn(entry.pool.close(timeout=5))
            raise await self._refused(endpoint, mode, plan_type) from e
        except BaseException:
            self._pools.give_back(entry)
            raise

    async def _answers(self, endpoint: TenantEndpoint) -> bool:
        """Whether the project's server answers a new connection now, within
        the connect timeout (see _ask); one question per server at a time,
        which every statement that needs it waits for."""
        asking = self._asking.get(endpoint.server_id)
        if asking is None:
            asking = asyncio.ensure_future(self._ask(endpoint))
            self._asking[endpoint.server_id] = asking
            server_id = endpoint.server_id
            asking.add_done_callback(lambda _: self._asking.pop(server_id, None))
        return await asyncio.shield(asking)

    async def _ask(self, endpoint: TenantEndpoint) -> bool:
        """Open a connection to the server and ask for TLS (an SSLRequest):
        a server that works answers at once, before any login ('S', 'N', or
        an error), and a paused one not at all. No credentials: a login as
        the project's role could be made slow by the tenant (a verifier of
        its own password with a huge iteration count is computed by libpq
        here, on the event loop), and a refusal the client makes (a full
        listen queue) would read as the server's answer."""
        async with self._opened(endpoint) as opened:
            if opened is None:
                return False
            reader, writer = opened
            try:
                writer.write(SSL_REQUEST)
                answer = await asyncio.wait_for(
                    reader.read(1), self.platform.settings.connect_timeout_s
                )
            except (OSError, TimeoutError):
                return False
            return answer != b""

    async def _room_for(
        self, key: tuple[uuid.UUID, Mode], entry: PoolEntry[AsyncConnectionPool], size: int
    ) -> None:
        """While statements of the project run on connections of their own,
        more of its statements wait here until those and the pool's together
        are fewer than its most at once, as they would wait for one of the
        pool's connections (and PoolTimeout after the same wait)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.platform.settings.connect_timeout_s
        while (
            own := self._unpooled.get(key, 0)
        ) and entry.pending + entry.checked_out + own >= size:
            left = deadline - loop.time()
            if left <= 0:
                raise PoolTimeout()
            self._room_waiters += 1
            try:
                await asyncio.wait_for(self._room.wait(), left)
            except TimeoutError:
                raise PoolTimeout() from None
            finally:
                self._room_waiters -= 1

    def _room_made(self) -> None:
        """A connection went back: wake the statements waiting for room."""
        if self._room_waiters:
            room, self._room = self._room, asyncio.Event()
            room.set()

    @staticmethod
    def _busy(endpoint: TenantEndpoint, mode: Mode, size: int) -> TooManyStatements:
        # The server is there: this project's connections are all busy.
        return TooManyStatements(
            f"project {endpoint.tenant_id} already runs {size} "
            f"{mode} statements through the SQL API in this API process, its most "
            "at once; retry when one has finished",
            limit=size,
        )

    async def _refused(
        self, endpoint: TenantEndpoint, mode: Mode, plan_type: str | None
    ) -> PgfleetError:
        """Why a login failed, in words (see connections.refusal)."""
        why = await asyncio.to_thread(refusal, self.platform, endpoint, mode, plan_type)
        if isinstance(why, RegionUnavailable):
            self._gone(endpoint)
        return why

    async def _connect_unpooled(
        self,
        endpoint: TenantEndpoint,
        mode: Mode,
        plan_type: str | None,
        key: tuple[uuid.UUID, Mode],
        size: int,
    ) -> psycopg.AsyncConnection[Any]:
        """A connection of its own (see _admit), with what a new pool's first
        login has: a knock unless a login there just succeeded, and a second
        attempt after one that timed out."""
        if self._unpooled.get(key, 0) >= size:
            raise self._busy(endpoint, mode, size)
        self._unpooled[key] = self._unpooled.get(key, 0) + 1
        try:
            if not self._recently_reached(endpoint) and not await self._knock(endpoint):
                raise self._gone(endpoint)
            s = self.platform.settings
            kwargs = {
                **endpoint.conninfo(mode, s.connect_timeout_s),
                "host": self._host(endpoint),
                "autocommit": True,
                "prepare_threshold": None,
            }
            try:
                try:
                    conn = await self._first_login(
                        endpoint, psycopg.AsyncConnection.connect(**kwargs), _close
                    )
                except psycopg.OperationalError as e:
                    if not login_timed_out(e):
                        raise
                    conn = await psycopg.AsyncConnection.connect(**kwargs)
            except psycopg.OperationalError as e:
                # A server that is not there is said at once, and so is one
                # that took both attempts' whole time to answer a login (it
                # accepts connections and does not serve them: frozen or
                # overwhelmed; the catalog, read over the admin's standing
                # session, would not say why). Otherwise why it refused the
                # login, in words.
                if login_timed_out(e) or not await self._knock(endpoint):
                    raise self._gone(endpoint) from e
                raise await self._refused(endpoint, mode, plan_type) from e
            try:
                await configure_loaders(conn)
            except BaseException:
                await conn.close()
                raise
            self._reached[endpoint.server_id] = time.monotonic()
            return conn
        except BaseException:
            self._release_unpooled(key)
            raise

    def _release_unpooled(self, key: tuple[uuid.UUID, Mode]) -> None:
        left = self._unpooled.get(key, 0) - 1
        if left > 0:
            self._unpooled[key] = left
        else:
            self._unpooled.pop(key, None)
        self._room_made()

    async def _first_login(
        self,
        endpoint: TenantEndpoint,
        login: Coroutine[Any, Any, psycopg.AsyncConnection[Any]],
        undo: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]],
    ) -> psycopg.AsyncConnection[Any]:
        """A first connection (a new pool's, or one of its own) on a server a
        login just reached: no knock first, but one if the login takes longer
        than PROBE_S, so a server that went down since is still said at once."""
        getting = asyncio.ensure_future(login)
        try:
            await asyncio.wait({getting}, timeout=PROBE_S)
            if not getting.done() and not await self._knock(endpoint):
                raise self._gone(endpoint)
            return await getting
        except BaseException:
            if not getting.done():
                getting.cancel()
            elif not getting.cancelled() and getting.exception() is None:
                await undo(getting.result())  # back to its pool, or closed
            raise

    async def _give_back(
        self,
        entry: PoolEntry[AsyncConnectionPool] | Unpooled,
        conn: psycopg.AsyncConnection[Any],
        reusable: bool,
    ) -> None:
        if isinstance(entry, Unpooled):
            # Its own connection: closed (no reset needed), nothing held idle.
            try:
                await conn.close()
            finally:
                self._release_unpooled(entry.key)
            return
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
            self._room_made()

    async def terminate(self, endpoint: TenantEndpoint, backend_pid: int) -> None:
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

        # Bounded: on a server that answers nothing (frozen) the admin
        # session hangs too, and the statement's call must still end.
        await asyncio.wait_for(asyncio.to_thread(kill), TERMINATE_WAIT_S)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
