"""The server registry: every regional server lives in the platform DB's
`servers` table (admin password encrypted); pgfleet keeps one small admin
connection pool per server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from pgfleet.config import ServerSpec, Settings
from pgfleet.crypto import SecretBox
from pgfleet.errors import NotFound, RegionUnavailable
from pgfleet.pooling import check_pooled, mark_returned
from pgfleet.regions import ServerLoad


@dataclass(frozen=True)
class ServerRecord:
    id: int
    name: str
    region: str
    host: str
    port: int
    admin_user: str
    admin_database: str
    sslmode: str
    capacity: int
    is_primary: bool
    enabled: bool
    embedded: bool
    admin_password: str = field(repr=False)

    def admin_conninfo(self, connect_timeout: float, dbname: str | None = None) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.admin_user,
            "password": self.admin_password,
            "dbname": dbname or self.admin_database,
            "sslmode": self.sslmode,
            "connect_timeout": max(1, round(connect_timeout)),
            "application_name": "pgfleet-admin",
            "options": ADMIN_SESSION_OPTIONS,
        }


# Admin work never waits on a lock or runs unbounded: a DDL step that queues
# behind a tenant's long transaction fails with 55P03 after lock_timeout and
# its operation retries it with backoff until the operation's deadline,
# instead of hanging (and queueing everyone else behind its own lock request).
ADMIN_SESSION_OPTIONS = "-c lock_timeout=10s -c statement_timeout=300s"

_SELECT_SERVERS = sql.SQL(
    "SELECT id, name, region, host, port, admin_user, admin_password_enc, admin_database, "
    "sslmode, capacity, is_primary, enabled, embedded FROM servers"
)


def sync_servers(
    conn: psycopg.Connection[Any], box: SecretBox, specs: list[tuple[ServerSpec, bool]]
) -> None:
    """Make the servers table match the configured servers.

    Servers no longer configured are disabled, never deleted: tenants may
    still live there.
    """
    names = [s.name for s, _ in specs]
    with conn.transaction():
        for spec, embedded in specs:
            conn.execute(
                """
                INSERT INTO servers (name, region, host, port, admin_user, admin_password_enc,
                                     admin_database, sslmode, capacity, is_primary, enabled,
                                     embedded)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, true, %s)
                ON CONFLICT (name) DO UPDATE SET
                  region = EXCLUDED.region, host = EXCLUDED.host, port = EXCLUDED.port,
                  admin_user = EXCLUDED.admin_user,
                  admin_password_enc = EXCLUDED.admin_password_enc,
                  admin_database = EXCLUDED.admin_database, sslmode = EXCLUDED.sslmode,
                  capacity = EXCLUDED.capacity, is_primary = EXCLUDED.is_primary,
                  enabled = true, embedded = EXCLUDED.embedded, updated_at = now()
                """,
                (
                    spec.name,
                    spec.region,
                    spec.host,
                    spec.port,
                    spec.admin_user,
                    box.encrypt(spec.admin_password.get_secret_value()),
                    spec.admin_database,
                    spec.sslmode,
                    spec.capacity,
                    spec.primary,
                    embedded,
                ),
            )
        conn.execute(
            "UPDATE servers SET enabled = false, updated_at = now() "
            "WHERE enabled AND NOT (name = ANY(%s))",
            (names,),
        )


class ServerRegistry:
    """Reads servers from the platform DB and hands out admin connections."""

    def __init__(self, settings: Settings, box: SecretBox, platform: ConnectionPool) -> None:
        self.settings = settings
        self.box = box
        self.platform = platform
        self._pools: dict[int, tuple[ServerRecord, ConnectionPool]] = {}
        self._lock = threading.Lock()

    def _row_to_record(self, row: dict[str, Any]) -> ServerRecord:
        enc = row.pop("admin_password_enc")
        return ServerRecord(**row, admin_password=self.box.decrypt(enc))

    def all(self, *, enabled_only: bool = False) -> list[ServerRecord]:
        with self.platform.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            where = sql.SQL(" WHERE enabled" if enabled_only else "")
            rows = cur.execute(
                sql.SQL("{}{} ORDER BY region, id").format(_SELECT_SERVERS, where)
            ).fetchall()
        return [self._row_to_record(r) for r in rows]

    def get(self, server_id: int) -> ServerRecord:
        with self.platform.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                sql.SQL("{} WHERE id = %s").format(_SELECT_SERVERS), (server_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"server {server_id} is not registered")
        return self._row_to_record(row)

    def loads(self) -> list[ServerLoad]:
        """Every server with the number of live projects it hosts."""
        with self.platform.connection() as conn:
            # tenant_counts is kept by triggers on tenants (migration 0005).
            rows = conn.execute(
                """
                SELECT s.id, s.name, s.region, s.capacity, s.is_primary, s.enabled,
                       coalesce((SELECT sum(c.n) FROM tenant_counts c
                                 WHERE c.server_id = s.id AND c.status <> 'deleted'), 0)::int
                FROM servers s ORDER BY s.id
                """
            ).fetchall()
        return [
            ServerLoad(
                id=r[0],
                name=r[1],
                region=r[2],
                capacity=r[3],
                is_primary=r[4],
                enabled=r[5],
                tenants=r[6],
            )
            for r in rows
        ]

    def _pool_for(self, server: ServerRecord) -> ConnectionPool:
        with self._lock:
            entry = self._pools.get(server.id)
            if entry is not None and entry[0] == server:
                return entry[1]
            if entry is not None:
                entry[1].close(timeout=1)
            pool = ConnectionPool(
                kwargs={
                    **server.admin_conninfo(self.settings.connect_timeout_s),
                    "autocommit": True,
                },
                min_size=0,
                max_size=self.settings.admin_pool_size,
                num_workers=1,
                timeout=self.settings.connect_timeout_s,
                max_idle=300,
                check=check_pooled,
                reset=mark_returned,
                name=f"admin-{server.name}",
                open=True,
            )
            self._pools[server.id] = (server, pool)
            return pool

    def _discard(self, server_id: int, pool: ConnectionPool) -> None:
        with self._lock:
            entry = self._pools.get(server_id)
            if entry is not None and entry[1] is pool:
                del self._pools[server_id]
        pool.close(timeout=0)

    @contextmanager
    def admin_connection(self, server: ServerRecord) -> Iterator[psycopg.Connection[Any]]:
        """An autocommit superuser connection to `server`, or RegionUnavailable."""
        pool = self._pool_for(server)
        try:
            cm = pool.connection()
            conn = cm.__enter__()
        except (PoolTimeout, psycopg.OperationalError) as e:
            # A failing pool backs off before it tries again; start afresh next
            # time so a server that comes back is used at once.
            self._discard(server.id, pool)
            raise RegionUnavailable(
                f"region {server.region} is unavailable: server {server.name} cannot be reached",
                region=server.region,
                server=server.name,
                reached=False,
            ) from e
        try:
            yield conn
        except psycopg.OperationalError as e:
            cm.__exit__(type(e), e, e.__traceback__)
            if not conn.broken:
                raise
            raise RegionUnavailable(
                f"region {server.region} is unavailable: lost the connection to "
                f"server {server.name}",
                region=server.region,
                server=server.name,
            ) from e
        except BaseException as e:
            cm.__exit__(type(e), e, e.__traceback__)
            raise
        else:
            cm.__exit__(None, None, None)

    @contextmanager
    def direct_admin_connection(
        self, server: ServerRecord, dbname: str
    ) -> Iterator[psycopg.Connection[Any]]:
        """An unpooled autocommit admin connection to one database of `server`."""
        try:
            conn = psycopg.connect(
                **server.admin_conninfo(self.settings.connect_timeout_s, dbname), autocommit=True
            )
        except psycopg.OperationalError as e:
            raise RegionUnavailable(
                f"region {server.region} is unavailable: lost the connection to "
                f"server {server.name}",
                region=server.region,
                server=server.name,
            ) from e
        with conn:
            yield conn

    def close(self) -> None:
        with self._lock:
            for _, pool in self._pools.values():
                pool.close(timeout=1)
            self._pools.clear()
