"""Prepared spares: whole projects-to-be, made ahead on every server.

A spare is everything a new project's server side is, under an opaque
placeholder name `pgfleet_spare_<hex>`: the gate role, the `_rw` role that
owns the database and the `_ro` role (both NOLOGIN, no password), the
database with CONNECT revoked from PUBLIC, and inside it the default
privileges that let `_ro` read what `_rw` makes. Nobody can use one: no
role of it can log in, and pg_hba admits a role only to the database named
like its gate.

Claiming one for a project is one short transaction on the server, in the
admin database (`claim_prepared`): rename the database and the three roles
to the project's names, give the login roles their passwords and the
plan's limits, allow login. Role OIDs do not change with a rename, so the
ownership, grants and default privileges made ahead are the project's.
The result is the same catalog state provisioning makes the slow way
(tests compare the two), so nothing downstream knows the difference.

The workers keep PGFLEET_SPARE_DATABASES ready per server (`refill_all`,
off the request path). Making one runs the slow path's own steps: its
in-database part in a session logged in as the spare's own `_rw` role,
with a one-time password that is never stored and is removed, with LOGIN,
before the spare is marked ready (a database comment). A spare that was not
finished (a crash while it was made) is never claimed and is dropped by
the next refill. When none is ready a create takes the slow path; it never
fails for want of a spare.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql

from pgfleet.config import Settings
from pgfleet.crypto import generate_password
from pgfleet.errors import RegionUnavailable
from pgfleet.fleet.registry import ServerRecord
from pgfleet.operations.registry import REGISTRY
from pgfleet.platform.core import Platform
from pgfleet.tenants.naming import ro_role_name, rw_role_name
from pgfleet.tenants.roles import role_settings
from pgfleet.tenants.server import (
    converge_database,
    converge_privileges,
    converge_roles,
    drop_on_server,
    login_role_attributes,
)
from pgfleet.tenants.template import ensure_template

log = logging.getLogger(__name__)

SPARE_PREFIX = "pgfleet_spare_"
READY = "pgfleet: prepared spare, ready"
CLAIMED = "claim prepared spare"

_SPARE_LOCK = 0x7370617265  # "spare": one refiller per server at a time
_LIKE = SPARE_PREFIX.replace("_", "\\_") + "%"


def _spares(conn: psycopg.Connection[Any], *, ready: bool | None, limit: int = 1000) -> list[str]:
    """The server's spares: the ready ones, the unfinished ones, or (None) all."""
    rows = conn.execute(
        "SELECT d.datname FROM pg_catalog.pg_database d "
        "LEFT JOIN pg_catalog.pg_shdescription c ON c.objoid = d.oid "
        "AND c.classoid = 'pg_catalog.pg_database'::pg_catalog.regclass "
        "WHERE d.datname LIKE %s "
        "AND (%s::bool IS NULL OR (c.description IS NOT DISTINCT FROM %s) = %s) "
        "ORDER BY d.datname LIMIT %s",
        (_LIKE, ready, READY, ready, limit),
    ).fetchall()
    return [r[0] for r in rows]


def _spare_roles(conn: psycopg.Connection[Any]) -> list[str]:
    """Roles of spares whose database is gone (a crash between the two)."""
    rows = conn.execute(
        "SELECT rolname FROM pg_catalog.pg_roles WHERE rolname LIKE %s "
        "AND pg_catalog.regexp_replace(rolname, '_(rw|ro)$', '') NOT IN "
        "(SELECT datname FROM pg_catalog.pg_database)",
        (_LIKE,),
    ).fetchall()
    return [r[0] for r in rows]


def ready_count(conn: psycopg.Connection[Any]) -> int:
    return len(_spares(conn, ready=True))


def claim_prepared(
    conn: psycopg.Connection[Any],
    name: str,
    *,
    password: str,
    ro_password: str,
    connection_limit: int,
    statement_timeout_ms: int,
    password_chosen: bool = False,
) -> bool:
    """Make a ready spare project `name`, in one transaction. False if the
    server has none ready, or if anything of `name` exists already (then the
    slow path converges what is there)."""
    for spare in _spares(conn, ready=True, limit=8):
        try:
            with conn.transaction():
                got = conn.execute(
                    "SELECT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext(%s))",
                    (spare,),
                ).fetchone()
                if not (got and got[0]):
                    continue  # another worker is claiming it
                # Everything else in one round trip (no parameters: the
                # simple query protocol takes several statements at once).
                stmts = _renames(spare, name)
                for role, secret, chosen in (
                    (rw_role_name(name), password, password_chosen),
                    (ro_role_name(name), ro_password, False),
                ):
                    ident = sql.Identifier(role)
                    attrs = login_role_attributes(
                        conn, role, secret, connection_limit=connection_limit, chosen=chosen
                    )
                    timeout = role_settings(role, statement_timeout_ms, name=name)[
                        "statement_timeout"
                    ]
                    stmts.append(sql.SQL("ALTER ROLE {} {}").format(ident, attrs))
                    stmts.append(
                        sql.SQL("ALTER ROLE {} SET statement_timeout = {}").format(
                            ident, sql.Literal(timeout)
                        )
                    )
                stmts.append(sql.SQL("COMMENT ON DATABASE {} IS NULL").format(sql.Identifier(name)))
                conn.execute(sql.SQL("; ").join(stmts))
            return True
        except (psycopg.errors.InvalidCatalogName, psycopg.errors.UndefinedObject):
            continue  # claimed by another worker meanwhile
        except psycopg.errors.ObjectInUse:
            continue  # a refiller is still in it
        except (psycopg.errors.DuplicateDatabase, psycopg.errors.DuplicateObject):
            return False  # `name` exists in part: the slow path converges it
    return False


def _renames(spare: str, name: str) -> list[sql.Composable]:
    """The statements that give a spare's database and roles `name`'s names."""
    stmts: list[sql.Composable] = [
        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
            sql.Identifier(spare), sql.Identifier(name)
        )
    ]
    for old, new in (
        (spare, name),
        (rw_role_name(spare), rw_role_name(name)),
        (ro_role_name(spare), ro_role_name(name)),
    ):
        stmts.append(
            sql.SQL("ALTER ROLE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new))
        )
    return stmts


def prepare_spare(p: Platform, server: ServerRecord, conn: psycopg.Connection[Any]) -> str:
    """Make one spare on `server` with the slow path's own steps (`conn` is
    an admin session in the admin database); returns its name."""
    spare = SPARE_PREFIX + uuid.uuid4().hex
    password = generate_password()  # for the in-database step only; never stored
    actions: list[str] = []
    converge_roles(
        conn,
        spare,
        password=password,
        ro_password=generate_password(),
        connection_limit=2,
        statement_timeout_ms=60_000,
        actions=actions,
    )
    converge_database(conn, spare, actions)
    rw = rw_role_name(spare)
    with p.servers.tenant_session(server, spare, rw, password, act_as=rw) as tconn:
        converge_privileges(tconn, spare)
    with conn.transaction():  # unusable from here on, then ready
        for role in (rw, ro_role_name(spare)):
            conn.execute(
                sql.SQL("ALTER ROLE {} NOLOGIN PASSWORD NULL").format(sql.Identifier(role))
            )
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(spare), sql.Literal(READY)
            )
        )
    return spare


def spare_target(settings: Settings, server: ServerRecord) -> int:
    """How many ready spares `server` keeps: its own size if configured
    (PGFLEET_SPARE_DATABASES_BY_SERVER), else PGFLEET_SPARE_DATABASES."""
    return settings.spare_databases_by_server.get(server.name, settings.spare_databases)


def refill_spares(
    p: Platform,
    server: ServerRecord,
    target: int,
    *,
    until: float | None = None,
    reserve: int | None = None,
) -> int:
    """Bring `server`'s ready spares up to `target`, first dropping any a
    crash left unfinished; returns how many were made. One refiller per
    server at a time (advisory lock). With `until` (a time.monotonic()
    value) it stops making spares then, and the next pass goes on: a worker
    asked to stop is never held up by a long refill.

    With `reserve`, the refill stands aside while creates are claiming this
    server's spares (fewer are ready than at the end of the last pass, or
    than a moment ago) and at least `reserve` are left: making a spare
    costs the server and the worker several claims' worth of work, which a
    burst of creates needs more (bench/provision.py: 42 spares made during
    200 creates). The pool fills up again in the first quiet pass, and a
    burst longer than the pool is served at the reserve's pace."""
    made = 0
    seen: dict[int, int] = p.component("spares_seen", dict)
    with p.servers.admin_connection(server) as conn:
        got = conn.execute("SELECT pg_try_advisory_lock(%s)", (_SPARE_LOCK,)).fetchone()
        if not (got and got[0]):
            return 0
        try:
            for spare in _spares(conn, ready=False):
                drop_on_server(conn, name=spare)
                log.info("dropped unfinished spare %s on %s", spare, server.name)
            for role in _spare_roles(conn):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
            ensure_template(p, server, conn)
            ready = ready_count(conn)
            claimed = ready < seen.get(server.id, ready)
            while ready < target and made < target:  # a pass makes at most `target`
                if until is not None and time.monotonic() >= until:
                    break
                if reserve is not None and claimed and ready >= reserve:
                    break
                prepare_spare(p, server, conn)
                made += 1
                p.metrics.spares_made.labels(server.region).inc()
                now = ready_count(conn)
                claimed = now <= ready
                ready = now
            seen[server.id] = ready
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_SPARE_LOCK,))
    return made


def spare_reserve(target: int) -> int:
    """The ready spares a refill keeps even while creates claim them."""
    return max(1, target // 4) if target else 0


def drop_spares(p: Platform, server: ServerRecord) -> int:
    """Drop every spare on `server` (a server leaving service)."""
    with p.servers.admin_connection(server) as conn:
        spares = _spares(conn, ready=None)
        for spare in spares:
            drop_on_server(conn, name=spare)
    return len(spares)


@REGISTRY.every("refill_spares", lambda s: s.worker_heartbeat_s)
def refill_all(platform: Platform) -> None:
    """Every server's prepared spares back up to its target, a pass at a
    time: each pass lasts about one heartbeat and visits the servers in a
    random order, so no server always waits behind another."""
    s = platform.settings
    until = time.monotonic() + max(1.0, s.worker_heartbeat_s)
    servers = [(spare_target(s, srv), srv) for srv in platform.servers.all(enabled_only=True)]
    random.shuffle(servers)
    for target, server in servers:
        if not target:
            continue
        try:
            refill_spares(platform, server, target, until=until, reserve=spare_reserve(target))
        except (RegionUnavailable, psycopg.OperationalError) as e:
            log.debug("spares for %s not refilled: %s", server.name, e)
        except psycopg.Error as e:  # not an outage: say it
            log.warning("spares for %s not refilled: %s", server.name, e)


def install_gauges(platform: Platform) -> None:
    """Each server's spare target in /metrics, beside the ready count its
    health checks record (pgfleet_spares_ready) and the counters of spares
    made and claimed: together, whether the refill keeps up."""

    def read() -> dict[str, list[tuple[dict[str, str], float]]]:
        return {
            "pgfleet_spares_target": [
                (
                    {"server": srv.name, "region": srv.region},
                    float(spare_target(platform.settings, srv)),
                )
                for srv in platform.servers.all(enabled_only=True)
            ]
        }

    platform.metrics.add_state(read)
