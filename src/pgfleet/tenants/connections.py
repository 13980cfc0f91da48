"""Routing connections to a project's regional server, logged in as the
project's own role.

Each (project, mode) gets a small psycopg pool; the number of pools is
capped and the least recently used idle pools are closed, so with any number
of projects the servers never run out of connections.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from pgfleet.errors import (
    Conflict,
    ConnectionLimitReached,
    CredentialsRejected,
    InvalidInput,
    PgfleetError,
    ProjectNotFound,
    RegionUnavailable,
)
from pgfleet.monitoring.fingerprint import fingerprint
from pgfleet.monitoring.querylog import QueryLogRecord, QueryLogWriter
from pgfleet.platform.core import Platform
from pgfleet.pooling import mark_returned, swept_pool
from pgfleet.regions import get_plan
from pgfleet.tenants import store

Mode = Literal["rw", "ro"]
MODES: tuple[Mode, ...] = ("rw", "ro")
P = TypeVar("P")


@dataclass(frozen=True)
class TenantEndpoint:
    """Where and as whom a project's connections go."""

    tenant_id: uuid.UUID
    region: str
    hosted_region: str
    server_id: int
    host: str
    port: int
    database: str
    user: str
    sslmode: str
    ro_user: str
    sslrootcert: str | None
    password: str = field(repr=False)
    ro_password: str = field(repr=False)

    def log_record(
        self,
        mode: str,
        *,
        elapsed_ms: float,
        row_count: int | None,
        outcome: str,
        shape: str,
        started_at: datetime,
    ) -> QueryLogRecord:
        """The query_logs row of one statement run here."""
        return QueryLogRecord(
            tenant_id=self.tenant_id,
            region=self.region,
            hosted_region=self.hosted_region,
            server_id=self.server_id,
            route=mode,
            execution_time_ms=round(elapsed_ms, 3),
            row_count=row_count,
            outcome=outcome,
            fingerprint=shape,
            executed_at=started_at,
        )

    def user_for(self, mode: Mode) -> str:
        return self.ro_user if mode == "ro" else self.user

    def password_for(self, mode: Mode) -> str:
        return self.ro_password if mode == "ro" else self.password

    def conninfo(self, mode: Mode, connect_timeout: float) -> dict[str, Any]:
        ci: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "dbname": self.database,
            "user": self.user_for(mode),
            "password": self.password_for(mode),
            "sslmode": self.sslmode,
            **({"sslrootcert": self.sslrootcert} if self.sslrootcert else {}),
            "connect_timeout": max(1, round(connect_timeout)),
            "application_name": f"pgfleet-{mode}",
        }
        return ci


def refusal(
    platform: Platform, endpoint: TenantEndpoint, mode: Mode, plan_type: str | None
) -> PgfleetError:
    """What to tell a caller whose connection to the project could not be
    made: its role at the plan's connection limit (429), or its region
    unreachable (503). Asks the server's catalog; only on that failure path."""
    unreachable = RegionUnavailable(
        f"region {endpoint.hosted_region} is unavailable: the project's server cannot be reached",
        region=endpoint.hosted_region,
    )
    try:
        why = platform.servers.why_refused(
            platform.servers.get(endpoint.server_id), endpoint.user_for(mode)
        )
    except PgfleetError:
        return unreachable
    if isinstance(why, ConnectionLimitReached):
        plan = get_plan(plan_type or "free")
        return ConnectionLimitReached(
            f"project {endpoint.tenant_id}'s {mode} role already has {plan.connection_limit} "
            f"connections open, the most its {plan.id} plan allows (direct connections count "
            "too); close some, or move to a larger plan",
            limit=plan.connection_limit,
            plan=plan.id,
        )
    if isinstance(why, CredentialsRejected):
        # The server is there and refused the login: not an outage. Most
        # often the password was changed from inside (ALTER ROLE ...
        # PASSWORD); pgfleet's own rotation keeps both sides in step.
        return CredentialsRejected(
            f"the server refused project {endpoint.tenant_id}'s stored {mode} credentials "
            "(was its password changed with ALTER ROLE? the SQL API logs in with the one "
            "pgfleet issued); `rotate-password` issues new ones to both",
            mode=mode,
        )
    return unreachable


def check_mode(mode: str) -> Mode:
    if mode not in MODES:
        raise InvalidInput(f"unknown mode {mode!r}; valid modes are: rw, ro")
    return mode


@dataclass
class PoolEntry(Generic[P]):
    endpoint: TenantEndpoint
    pool: P
    size: int = 0  # what the pool was made for (0: the client's fixed size)
    in_use: int = 0  # requests holding or waiting for one of its connections
    checked_out: int = 0  # connections handed out (kept by the async gateway)
    pending: int = 0  # requests waiting in the pool for a connection (the same)
    served: bool = False  # whether the pool has handed out a connection yet (the same)


class PoolCache(Generic[P]):
    """Pools per (project, mode), least recently used first. At most `cap`
    pools are kept: idle ones beyond it are handed back to be closed, so with
    any number of projects a server sees at most cap x pool size connections
    from this process. Thread-safe; no I/O happens under the lock."""

    def __init__(self, cap: Callable[[], int]) -> None:
        self._cap = cap
        self._pools: OrderedDict[tuple[uuid.UUID, Mode], PoolEntry[P]] = OrderedDict()
        self._lock = threading.Lock()

    def take(
        self, endpoint: TenantEndpoint, mode: Mode, make: Callable[[], P], size: int = 0
    ) -> tuple[PoolEntry[P], list[P]]:
        """The entry for (project, mode), marked in use, and the pools to close
        (a rotated password, a moved project or a new pool size, and the
        evicted ones)."""
        key = (endpoint.tenant_id, mode)
        stale: list[P] = []
        with self._lock:
            entry = self._pools.get(key)
            if entry is not None and (entry.endpoint != endpoint or entry.size != size):
                stale.append(entry.pool)  # password rotated, project moved, plan changed
                del self._pools[key]
                entry = None
            if entry is None:
                entry = PoolEntry(endpoint, make(), size=size)
                self._pools[key] = entry
            self._pools.move_to_end(key)
            entry.in_use += 1
            cap = self._cap()
            if len(self._pools) > cap:
                for k in list(self._pools):
                    if len(self._pools) <= cap:
                        break
                    if self._pools[k].in_use == 0:
                        stale.append(self._pools.pop(k).pool)
        return entry, stale

    def holds(self, tenant_id: uuid.UUID, mode: Mode) -> bool:
        """Whether a pool of (project, mode) is kept."""
        with self._lock:
            return (tenant_id, mode) in self._pools

    def give_back(self, entry: PoolEntry[P]) -> None:
        with self._lock:
            entry.in_use -= 1

    def discard(self, entry: PoolEntry[P]) -> None:
        with self._lock:
            for key, value in list(self._pools.items()):
                if value is entry:
                    del self._pools[key]

    def pop_tenant(self, tenant_id: uuid.UUID) -> list[P]:
        with self._lock:
            return [
                self._pools.pop((tenant_id, m)).pool for m in MODES if (tenant_id, m) in self._pools
            ]

    def drain(self) -> list[P]:
        with self._lock:
            pools = [e.pool for e in self._pools.values()]
            self._pools.clear()
        return pools

    def __len__(self) -> int:
        with self._lock:
            return len(self._pools)


class DatabasePlatformClient:
    """The seed's DatabasePlatformClient, routing by region. One per
    Platform: `DatabasePlatformClient.of(platform)`."""

    @classmethod
    def of(cls, platform: Platform) -> DatabasePlatformClient:
        def make() -> DatabasePlatformClient:
            client = cls(platform)
            platform.pool_counters.append(client.pool_count)
            return client

        return platform.component("tenant_client", make, close=cls.close)

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._pools: PoolCache[ConnectionPool] = PoolCache(
            lambda: platform.settings.tenant_pool_cap_per_process
        )
        # Decrypted passwords by tenant, keyed by their ciphertexts (Fernet is
        # not free, and the hot path would otherwise decrypt on every call).
        self._secrets: OrderedDict[uuid.UUID, tuple[tuple[str, str], tuple[str, str]]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    def endpoint(self, tenant_id: uuid.UUID | str) -> TenantEndpoint:
        try:
            tid = uuid.UUID(str(tenant_id))
        except ValueError:
            raise ProjectNotFound(f"project {tenant_id} does not exist") from None
        with self.platform.db.connection() as conn:
            row = store.get(conn, tid)
        if row is None or row.status == "deleted":
            raise ProjectNotFound(f"project {tid} does not exist")
        return self.endpoint_from_row(
            {
                "id": row.id,
                "region": row.region,
                "status": row.status,
                "connection_info": row.connection_info,
            }
        )

    def endpoint_from_row(self, row: dict[str, Any]) -> TenantEndpoint:
        """The endpoint of a tenants row (id, region, status, connection_info)."""
        tid = row["id"]
        info = row["connection_info"] or {}
        if row["status"] != "active" or "ro_password_enc" not in info:
            raise Conflict(f"project {tid} is {row['status']}, not active", status=row["status"])
        key = (info["password_enc"], info["ro_password_enc"])
        with self._lock:
            cached = self._secrets.get(tid)
        if cached is not None and cached[0] == key:
            password, ro_password = cached[1]
        else:
            password = self.platform.secrets.decrypt(info["password_enc"])
            ro_password = self.platform.secrets.decrypt(info["ro_password_enc"])
            with self._lock:
                self._secrets[tid] = (key, (password, ro_password))
                self._secrets.move_to_end(tid)
                while len(self._secrets) > 10_000:
                    self._secrets.popitem(last=False)
        return TenantEndpoint(
            tenant_id=tid,
            region=row["region"],
            hosted_region=info["hosted_region"],
            server_id=info["server_id"],
            host=info["host"],
            port=info["port"],
            database=info["database"],
            user=info["user"],
            sslmode=info["sslmode"],
            ro_user=info["ro_user"],
            sslrootcert=info.get("sslrootcert"),
            password=password,
            ro_password=ro_password,
        )

    def _plan_of(self, tenant_id: uuid.UUID) -> str | None:
        try:
            with self.platform.db.connection() as conn:
                return store.plan_of(conn, tenant_id)
        except PgfleetError:
            return None

    def _make_pool(self, endpoint: TenantEndpoint, mode: Mode) -> ConnectionPool:
        settings = self.platform.settings
        return swept_pool(
            # No server-side prepared statements: DISCARD ALL drops them.
            kwargs={
                **endpoint.conninfo(mode, settings.connect_timeout_s),
                "prepare_threshold": None,
            },
            min_size=0,
            max_size=settings.tenant_pool_size,
            num_workers=1,
            timeout=settings.connect_timeout_s,
            max_idle=60,
            configure=_make_read_only if mode == "ro" else None,
            reset=_reset_session,
            name=f"{endpoint.database}-{mode}",
            open=True,
        )

    @contextmanager
    def get_tenant_connection(
        self,
        tenant_id: uuid.UUID | str,
        mode: str = "rw",
        *,
        log_queries: bool = False,
        endpoint: TenantEndpoint | None = None,
    ) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection to the project's server as the project's role.

        `ro` connections log in as the project's read-only role (SELECT only,
        every transaction read-only). With `log_queries`, every statement run
        through it writes a query_logs row. Use as a context
        manager; the connection goes back to its pool on exit.
        """
        m = check_mode(mode)
        if endpoint is None:
            endpoint = self.endpoint(tenant_id)
        entry, stale = self._pools.take(endpoint, m, lambda: self._make_pool(endpoint, m))
        for p in stale:
            p.close(timeout=0)
        try:
            try:
                cm = entry.pool.connection()
                conn = cm.__enter__()
            except (PoolTimeout, psycopg.OperationalError) as e:
                # Retry afresh next time, without the pool's backoff.
                self._pools.discard(entry)
                entry.pool.close(timeout=0)
                raise refusal(self.platform, endpoint, m, self._plan_of(endpoint.tenant_id)) from e
            if log_queries:
                conn.cursor_factory = _logging_cursor(self, endpoint, m)
            try:
                yield conn
            except BaseException as e:
                conn.cursor_factory = psycopg.Cursor
                cm.__exit__(type(e), e, e.__traceback__)
                raise
            else:
                conn.cursor_factory = psycopg.Cursor
                cm.__exit__(None, None, None)
        finally:
            self._pools.give_back(entry)

    def forget(self, tenant_id: uuid.UUID | str) -> None:
        """Close the pools of a project (deleted, moved, password rotated)."""
        for p in self._pools.pop_tenant(uuid.UUID(str(tenant_id))):
            p.close(timeout=1)

    def pool_count(self) -> int:
        return len(self._pools)

    def close(self) -> None:
        for p in self._pools.drain():
            p.close(timeout=1)


def _make_read_only(conn: psycopg.Connection[Any]) -> None:
    conn.read_only = True


def _reset_session(conn: psycopg.Connection[Any]) -> None:
    """Whatever the last user SET (roles, timeouts, temp tables), the next one
    starts clean."""
    autocommit = conn.autocommit
    conn.autocommit = True
    try:
        conn.execute("DISCARD ALL")
    finally:
        conn.autocommit = autocommit
    mark_returned(conn)


def _logging_cursor(
    client: DatabasePlatformClient, endpoint: TenantEndpoint, mode: Mode
) -> type[psycopg.Cursor[Any]]:
    """A cursor class that writes one query_logs row per execute()."""

    class LoggingCursor(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **kw: Any) -> Any:
            started = datetime.now(UTC)
            t0 = time.perf_counter()
            outcome = "ok"
            try:
                return super().execute(query, params, **kw)
            except psycopg.Error as e:
                outcome = e.sqlstate or "error"
                raise
            finally:
                text = (
                    query
                    if isinstance(query, str)
                    else (query.decode() if isinstance(query, bytes) else query.as_string(self))
                )
                QueryLogWriter.of(client.platform).log(
                    endpoint.log_record(
                        mode,
                        elapsed_ms=(time.perf_counter() - t0) * 1000,
                        row_count=self.rowcount if self.rowcount >= 0 else None,
                        outcome=outcome,
                        shape=fingerprint(text),
                        started_at=started,
                    )
                )

    return LoggingCursor
