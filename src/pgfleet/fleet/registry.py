"""The server registry: every regional server lives in the platform DB's
`servers` table (admin password encrypted); pgfleet keeps one small admin
connection pool per server.

Sessions pgfleet opens on a regional server, and the one rule they follow:
no privileged session ever resolves a name a tenant controls.
- `admin_connection`: the admin, in the server's admin database
  (`postgres`) only, never in a tenant's database. Nothing a tenant owns
  lives there.
- `tenant_session`: inside a project's database, logged in as the project's
  own login role: whatever the tenant planted there runs with the tenant's
  own privileges and gains it nothing.
- `probe_session`: inside a database that has no live project, as a role
  with no privilege at all (the reconciler counts what it holds).
Every one pins `search_path` to `pg_catalog, pg_temp` in its startup packet
(which overrides what ALTER ROLE/DATABASE ... SET put there) and bounds its
lock waits and statements.

A session doing work on a project's objects names the project's roles
(`evict=`): when one of their sessions blocks it (a tenant's open
transaction holding a lock on its own role, database or tables), that
session is ended, so a tenant can delay work on its own project by a second
at most and never hold an admin connection.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from pgfleet.config import ServerSpec, Settings
from pgfleet.crypto import SecretBox, generate_password
from pgfleet.errors import (
    ConnectionLimitReached,
    CredentialsRejected,
    NotFound,
    PgfleetError,
    RegionUnavailable,
)
from pgfleet.pooling import ConnectionSource, swept_pool
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
    sslrootcert: str | None = None
    probe_password: str | None = field(default=None, repr=False)

    def tls(self) -> dict[str, Any]:
        """How to reach the server over TLS (sslmode, and the CA to verify it by)."""
        out: dict[str, Any] = {"sslmode": self.sslmode}
        if self.sslrootcert:
            out["sslrootcert"] = self.sslrootcert
        return out

    def admin_conninfo(self, connect_timeout: float) -> dict[str, Any]:
        """The admin, in the admin database: the only place it ever logs in."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.admin_user,
            "password": self.admin_password,
            "dbname": self.admin_database,
            **self.tls(),
            "connect_timeout": max(1, round(connect_timeout)),
            "application_name": "pgfleet-admin",
            "options": PLATFORM_SESSION_OPTIONS,
        }


# Every session pgfleet opens on a regional server resolves names in
# pg_catalog only (pg_temp last, where nothing of a tenant's can be), and
# never waits on a lock or runs unbounded: a DDL step that queues behind a
# tenant's long transaction fails with 55P03 after lock_timeout and its
# operation retries it with backoff until the operation's deadline, instead
# of hanging (and queueing everyone else behind its own lock request).
# Options in the startup packet win over ALTER ROLE/DATABASE ... SET.
PLATFORM_SESSION_OPTIONS = (
    "-c search_path=pg_catalog,pg_temp -c lock_timeout=10s -c statement_timeout=300s "
    "-c idle_in_transaction_session_timeout=300s -c default_transaction_read_only=off"
)
# How long a session doing work on a project's objects waits behind one of
# the project's own sessions before that session is ended, and how often it
# looks again while it is still blocked.
EVICT_AFTER_S = 1.0
EVICT_EVERY_S = 0.5
# The role with no privilege that looks inside databases without a live project.
PROBE_ROLE = "pgfleet_probe"


log = logging.getLogger(__name__)


class _Evictor:
    """While `pid` runs, ends the sessions of `roles` that block it (the
    project's own sessions: a tenant can only delay work on its own project).
    It looks only once `pid` has been busy for EVICT_AFTER_S, from a
    connection of its own, so quick work costs nothing but a thread."""

    def __init__(self, connect: Any, server: ServerRecord, pid: int, roles: Sequence[str]) -> None:
        self.connect, self.server, self.pid, self.roles = connect, server, pid, list(roles)
        self.ended = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"evict-{pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._stop.wait(EVICT_AFTER_S):
            return
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self._stop.is_set():
                try:
                    if conn is None or conn.closed:
                        conn = self.connect()
                    rows = conn.execute(
                        "SELECT a.pid, a.usename, pg_catalog.pg_terminate_backend(a.pid) "
                        "FROM pg_catalog.pg_stat_activity a "
                        "WHERE a.pid = ANY(pg_catalog.pg_blocking_pids(%s)) "
                        "AND a.usename = ANY(%s)",
                        (self.pid, self.roles),
                    ).fetchall()
                except (psycopg.Error, PgfleetError) as e:
                    log.debug("server %s: cannot look for blockers: %s", self.server.name, e)
                    rows = []
                for pid, user, _ in rows:
                    self.ended += 1
                    log.warning(
                        "server %s: ended session %s of %s: it blocked pgfleet's work on "
                        "its project",
                        self.server.name,
                        pid,
                        user,
                    )
                self._stop.wait(EVICT_EVERY_S)
        finally:
            if conn is not None:
                conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


_SELECT_SERVERS = sql.SQL(
    "SELECT id, name, region, host, port, admin_user, admin_password_enc, admin_database, "
    "sslmode, sslrootcert, probe_password_enc, capacity, is_primary, enabled, embedded "
    "FROM servers"
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
                                     admin_database, sslmode, sslrootcert, probe_password_enc,
                                     capacity, is_primary, enabled, embedded)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, true, %s)
                ON CONFLICT (name) DO UPDATE SET
                  region = EXCLUDED.region, host = EXCLUDED.host, port = EXCLUDED.port,
                  admin_user = EXCLUDED.admin_user,
                  admin_password_enc = EXCLUDED.admin_password_enc,
                  admin_database = EXCLUDED.admin_database, sslmode = EXCLUDED.sslmode,
                  sslrootcert = EXCLUDED.sslrootcert,
                  probe_password_enc = coalesce(servers.probe_password_enc,
                                                EXCLUDED.probe_password_enc),
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
                    spec.sslrootcert,
                    box.encrypt(generate_password()),
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

    def __init__(self, settings: Settings, box: SecretBox, platform: ConnectionSource) -> None:
        self.settings = settings
        self.box = box
        self.platform = platform
        self._pools: dict[int, tuple[ServerRecord, ConnectionPool]] = {}
        self._lock = threading.Lock()
        self._plain: dict[str, str] = {}

    def _decrypt(self, enc: str) -> str:
        """Servers are read on every create, several times: each stored
        password is decrypted once per process (by its ciphertext, so a
        rotated one is decrypted afresh)."""
        plain = self._plain.get(enc)
        if plain is None:
            plain = self._plain[enc] = self.box.decrypt(enc)
        return plain

    def _row_to_record(self, row: dict[str, Any]) -> ServerRecord:
        enc = row.pop("admin_password_enc")
        probe = row.pop("probe_password_enc")
        return ServerRecord(
            **row,
            admin_password=self._decrypt(enc),
            probe_password=self._decrypt(probe) if probe else None,
        )

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
            pool = swept_pool(
                kwargs={
                    **server.admin_conninfo(self.settings.connect_timeout_s),
                    "autocommit": True,
                },
                min_size=0,
                max_size=self.settings.admin_pool_size,
                num_workers=1,
                timeout=self.settings.connect_timeout_s,
                max_idle=300,
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
    def admin_connection(
        self, server: ServerRecord, *, evict: Sequence[str] = ()
    ) -> Iterator[psycopg.Connection[Any]]:
        """An autocommit superuser connection to `server`, or RegionUnavailable.
        Sessions of the roles in `evict` that block it are ended (see the
        module's docstring)."""
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
        evictor = self._evictor(server, conn, evict)
        try:
            yield conn
        except psycopg.OperationalError as e:
            if evictor is not None:
                evictor.stop()
                evictor = None
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
            if evictor is not None:
                evictor.stop()
                evictor = None
            cm.__exit__(type(e), e, e.__traceback__)
            raise
        else:
            if evictor is not None:
                evictor.stop()
            cm.__exit__(None, None, None)

    def _evictor(
        self, server: ServerRecord, conn: psycopg.Connection[Any], roles: Sequence[str]
    ) -> _Evictor | None:
        if not roles:
            return None
        conninfo = {**server.admin_conninfo(self.settings.connect_timeout_s), "autocommit": True}
        return _Evictor(lambda: psycopg.connect(**conninfo), server, conn.info.backend_pid, roles)

    def why_refused(self, server: ServerRecord, role: str) -> PgfleetError:
        """Why `role` could not log in to `server`, from the catalog (libpq
        gives no SQLSTATE for a failed connection, and the message text is
        the server's, maybe translated): the server unreachable, the role
        at its connection limit, or its credentials refused."""
        try:
            with self.admin_connection(server) as conn:
                # One round trip: whether every slot is taken, and the role
                # (its columns null when it does not exist).
                got = conn.execute(
                    "SELECT (SELECT count(*) >= current_setting('max_connections')::int "
                    "- current_setting('superuser_reserved_connections')::int "
                    "FROM pg_catalog.pg_stat_activity WHERE backend_type = 'client backend'), "
                    "r.rolcanlogin, r.rolconnlimit, (SELECT count(*) FROM "
                    "pg_catalog.pg_stat_activity a WHERE a.usename = r.rolname) "
                    "FROM (SELECT 1) one LEFT JOIN pg_catalog.pg_roles r ON r.rolname = %s",
                    (role,),
                ).fetchone()
        except RegionUnavailable as e:
            return e
        full = bool(got and got[0])
        row = got[1:] if got and got[1] is not None else None
        if full:
            # Every slot taken: no login of anyone's gets in, whatever its role.
            return RegionUnavailable(
                f"region {server.region} is unavailable: server {server.name} has every "
                "connection slot taken (max_connections)",
                region=server.region,
                server=server.name,
            )
        if row is not None and row[0] and 0 <= row[1] <= row[2]:
            return ConnectionLimitReached(
                f"role {role} already has {row[2]} connections open on server {server.name}, "
                f"its limit of {row[1]}",
                limit=row[1],
                role=role,
            )
        state = "does not exist" if row is None else "may not log in" if not row[0] else ""
        return CredentialsRejected(
            f"server {server.name} refused the stored credentials of {role}"
            + (f" (the role {state})" if state else "")
            + "; the reconciler repairs what differs",
            server=server.name,
            user=role,
        )

    def _connect(self, server: ServerRecord, conninfo: dict[str, Any]) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(**conninfo, autocommit=True)
        except psycopg.errors.ConnectionTimeout as e:
            # Nothing was refused: the server took no new login in time (its
            # postmaster frozen, say), though a pooled session may still
            # answer. Asking the catalog why would say "credentials refused".
            raise RegionUnavailable(
                f"region {server.region} is unavailable: server {server.name} took no new "
                "login in time",
                region=server.region,
                server=server.name,
            ) from e
        except psycopg.OperationalError as e:
            raise self.why_refused(server, str(conninfo["user"])) from e

    @contextmanager
    def tenant_session(
        self,
        server: ServerRecord,
        database: str,
        user: str,
        password: str,
        *,
        act_as: str,
        evict: Sequence[str] = (),
    ) -> Iterator[psycopg.Connection[Any]]:
        """An unpooled autocommit session inside a project's database, logged
        in as the project's login role `user` and acting as `act_as` (its main
        role; an alternate login role is a member of it). Names are resolved
        in pg_catalog only. Other sessions of the roles in `evict` that block
        it are ended."""
        conninfo = {
            "host": server.host,
            "port": server.port,
            "dbname": database,
            "user": user,
            "password": password,
            **server.tls(),
            "connect_timeout": max(1, round(self.settings.connect_timeout_s)),
            "application_name": "pgfleet-maintenance",
            "options": f"{PLATFORM_SESSION_OPTIONS} -c role={act_as}",
        }
        with self._connect(server, conninfo) as conn:
            evictor = self._evictor(server, conn, evict)
            try:
                yield conn
            finally:
                if evictor is not None:
                    evictor.stop()

    @contextmanager
    def template_session(self, server: ServerRecord) -> Iterator[psycopg.Connection[Any]]:
        """An unpooled admin session in `template1`, the database every new
        one copies. No tenant can enter it (pg_hba admits a project's roles to
        their own database only), so nothing in it is a tenant's."""
        conninfo = {
            **server.admin_conninfo(self.settings.connect_timeout_s),
            "dbname": "template1",
            "application_name": "pgfleet-template",
        }
        with self._connect(server, conninfo) as conn:
            yield conn

    @contextmanager
    def probe_session(
        self, server: ServerRecord, database: str
    ) -> Iterator[psycopg.Connection[Any]]:
        """An unpooled session inside `database` as the probe role, which has
        no privilege, owns nothing and is a member of nothing."""
        if not server.probe_password:
            raise CredentialsRejected(f"server {server.name} has no probe role password yet")
        conninfo = {
            "host": server.host,
            "port": server.port,
            "dbname": database,
            "user": PROBE_ROLE,
            "password": server.probe_password,
            **server.tls(),
            "connect_timeout": max(1, round(self.settings.connect_timeout_s)),
            "application_name": "pgfleet-probe",
            "options": PLATFORM_SESSION_OPTIONS,
        }
        with self._connect(server, conninfo) as conn:
            yield conn

    def close(self) -> None:
        with self._lock:
            for _, pool in self._pools.values():
                pool.close(timeout=1)
            self._pools.clear()
