"""Prepared spares: whole projects-to-be, made and routed ahead on every server.

A spare is everything a new project's server side is, made under the
names of the project it will become: its id is chosen when it is made,
and its passwords too (stored encrypted in the platform DB's `spares`
table). On the server: the gate role, the `_rw` role that owns the
database and the `_ro` role, the database with CONNECT revoked from PUBLIC,
and inside it the default privileges that let `_ro` read what `_rw` makes.
In every router: its route, and its login roles' verifiers.

Nobody can use one. Its login roles are NOLOGIN: PostgreSQL refuses them
whatever password is offered, and the routers can only forward a login to
the server. The roles keep their verifiers because the routers must hold
them before the claim (so a create has nothing to publish); the passwords
exist only encrypted in the platform DB, and no session of a spare's role
was ever opened through a router, so no pooled server connection of it
exists to be handed out. pg_hba admits a role only to the database named
like its gate.

A create takes a ready spare of the server it is placed on in the
transaction that inserts its project (`take`): the project's id and
passwords are the spare's. Its provision operation then claims it on the
server in one short transaction (`claim_prepared`): allow login, and the
plan's limits. Nothing is renamed and no password is set, so the routers
already have everything, and the route step publishes nothing (unless the
plan's route differs from a spare's). The result is the same catalog
state provisioning makes the slow way (tests compare the two), so nothing
downstream knows the difference.

The workers keep PGFLEET_SPARE_DATABASES ready per server (`refill_all`,
off the request path). Making one runs the slow path's own steps, its
in-database part in a session logged in as the spare's own `_rw` role
(straight to the server) before its login roles are made NOLOGIN and it is
marked on the server (a database comment). A spare's row goes `making` ->
`made` (whole: the routers may learn it from then on) -> `ready`: the
spares a pass made are published to the routers at once (one edit and one
reload for the batch), and only then are they ready, once their verifiers
were read. A spare a crash left `making` is dropped by a refill of its
server once it is stale; one left `made` is published and made ready by
the next. One a create gave back (cancelled before it started) is `drop`,
and the next refill drops it, on the server and in the routers. When none
is ready a create takes the slow path; it never fails for want of a spare.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pgfleet.config import Settings
from pgfleet.crypto import generate_password
from pgfleet.errors import PgfleetError, RegionUnavailable
from pgfleet.fleet.registry import ServerRecord
from pgfleet.operations.registry import REGISTRY
from pgfleet.platform.core import Platform
from pgfleet.tenants import routing
from pgfleet.tenants.naming import ro_role_name, rw_role_name, tenant_db_name
from pgfleet.tenants.roles import role_settings
from pgfleet.tenants.server import (
    converge_database,
    converge_privileges,
    converge_roles,
    drop_gone_roles,
    drop_on_server,
    login_role_attributes,
)
from pgfleet.tenants.template import ensure_template

log = logging.getLogger(__name__)

READY = "pgfleet: prepared spare, ready"
CLAIMED = "claim prepared spare"

_SPARE_LOCK = 0x7370617265  # "spare": one refiller per server at a time
# A spare `making` for this long was left by a crash (making one takes a
# second or so): a refill drops it.
_STALE = "10 minutes"
# Spares of earlier versions, made under placeholder names and renamed
# when claimed: never claimed now, dropped by the next refill.
_LEGACY_LIKE = "pgfleet\\_spare\\_%"


@dataclass(frozen=True)
class Spare:
    """A spare a create took: the project's id and passwords (encrypted)."""

    id: uuid.UUID
    password_enc: str = field(repr=False)
    ro_password_enc: str = field(repr=False)


def take(conn: psycopg.Connection[Any], server_id: int) -> Spare | None:
    """A ready spare of `server_id`, taken for a project that `conn`'s
    transaction inserts (its id is the spare's); None if none is ready. If
    the transaction rolls back, the spare is ready again."""
    row = conn.execute(
        "DELETE FROM spares WHERE id = (SELECT id FROM spares WHERE server_id = %s "
        "AND state = 'ready' "
        "ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED) "
        "RETURNING id, password_enc, ro_password_enc",
        (server_id,),
    ).fetchone()
    return Spare(*row) if row else None


def give_back(
    conn: psycopg.Connection[Any], tenant_id: uuid.UUID, server_id: int, info: dict[str, Any]
) -> None:
    """A spare a create took and never started on: back in the table, to
    drop (its id is a project's now, deleted, so it is never taken again);
    the next refill of its server drops it."""
    conn.execute(
        "INSERT INTO spares (id, server_id, password_enc, ro_password_enc, state) "
        "VALUES (%s, %s, %s, %s, 'drop') ON CONFLICT (id) DO NOTHING",  # an undo run again
        (tenant_id, server_id, info["password_enc"], info["ro_password_enc"]),
    )


def ready_count(conn: psycopg.Connection[Any]) -> int:
    """The spares marked ready on the server `conn` is an admin session of."""
    row = conn.execute(
        "SELECT count(*) FROM pg_catalog.pg_database d "
        "JOIN pg_catalog.pg_shdescription c ON c.objoid = d.oid "
        "AND c.classoid = 'pg_catalog.pg_database'::pg_catalog.regclass "
        "WHERE c.description = %s",
        (READY,),
    ).fetchone()
    return int(row[0]) if row else 0


def claim_prepared(
    conn: psycopg.Connection[Any],
    name: str,
    *,
    connection_limit: int,
    statement_timeout_ms: int,
) -> bool:
    """Make the spare `name` (made under the project's own names) the
    project, in one transaction and one round trip: its login roles may log
    in, with the plan's limits. False if `name` is not a ready spare on
    this server, or no longer one: a crash after a claim committed sends
    the retry down the slow path, which converges what is there."""
    with conn.transaction():
        row = conn.execute(
            "SELECT c.description IS NOT DISTINCT FROM %s FROM pg_catalog.pg_database d "
            "LEFT JOIN pg_catalog.pg_shdescription c ON c.objoid = d.oid "
            "AND c.classoid = 'pg_catalog.pg_database'::pg_catalog.regclass "
            "WHERE d.datname = %s",
            (READY, name),
        ).fetchone()
        if not (row and row[0]):
            return False
        # Everything else in one round trip (no parameters: the simple
        # query protocol takes several statements at once).
        stmts: list[sql.Composable] = []
        for role in (rw_role_name(name), ro_role_name(name)):
            ident = sql.Identifier(role)
            attrs = login_role_attributes(conn, role, None, connection_limit=connection_limit)
            timeout = role_settings(role, statement_timeout_ms, name=name)["statement_timeout"]
            stmts.append(sql.SQL("ALTER ROLE {} {}").format(ident, attrs))
            stmts.append(
                sql.SQL("ALTER ROLE {} SET statement_timeout = {}").format(
                    ident, sql.Literal(timeout)
                )
            )
        stmts.append(sql.SQL("COMMENT ON DATABASE {} IS NULL").format(sql.Identifier(name)))
        conn.execute(sql.SQL("; ").join(stmts))
    return True


def _make(
    p: Platform,
    server: ServerRecord,
    conn: psycopg.Connection[Any],
    name: str,
    password: str,
    ro_password: str,
) -> None:
    actions: list[str] = []
    converge_roles(
        conn,
        name,
        password=password,
        ro_password=ro_password,
        connection_limit=2,
        statement_timeout_ms=60_000,
        actions=actions,
    )
    converge_database(conn, name, actions)
    rw = rw_role_name(name)
    with p.servers.tenant_session(server, name, rw, password, act_as=rw) as tconn:
        converge_privileges(tconn, name)
    with conn.transaction():  # unusable from here on, then ready on the server
        conn.execute(
            sql.SQL(
                "ALTER ROLE {} NOLOGIN; ALTER ROLE {} NOLOGIN; COMMENT ON DATABASE {} IS {}"
            ).format(
                sql.Identifier(rw),
                sql.Identifier(ro_role_name(name)),
                sql.Identifier(name),
                sql.Literal(READY),
            )
        )


def _unmake(p: Platform, conn: psycopg.Connection[Any], sid: uuid.UUID, name: str) -> None:
    """A spare that could not be finished is dropped at once, or marked to
    drop at the next pass if even that fails. Left `making`, one more
    stayed behind at every pass until it was stale (seen: 22 in two minutes
    while new logins to the server failed and its admin session worked)."""
    try:
        drop_on_server(conn, name=name)
        with p.db.connection() as pconn:
            pconn.execute("DELETE FROM spares WHERE id = %s", (sid,))
    except Exception as e:
        log.warning("spare %s not dropped (%s); the next refill drops it", sid, e)
        with contextlib.suppress(Exception), p.db.connection() as pconn:
            pconn.execute("UPDATE spares SET state = 'drop' WHERE id = %s", (sid,))


def prepare_spare(p: Platform, server: ServerRecord, conn: psycopg.Connection[Any]) -> uuid.UUID:
    """Make one spare on `server` with the slow path's own steps (`conn` is
    an admin session in the admin database); returns its id. Its row is
    recorded first (`making`), so a crash leaves something to drop, and is
    `made` once the spare is whole."""
    sid = uuid.uuid4()
    name = tenant_db_name(sid)
    password, ro_password = generate_password(), generate_password()
    with p.db.connection() as pconn:
        pconn.execute(
            "INSERT INTO spares (id, server_id, password_enc, ro_password_enc) "
            "VALUES (%s, %s, %s, %s)",
            (sid, server.id, p.secrets.encrypt(password), p.secrets.encrypt(ro_password)),
        )
    try:
        _make(p, server, conn, name, password, ro_password)
    except Exception:
        _unmake(p, conn, sid, name)
        raise
    with p.db.connection() as pconn:
        pconn.execute("UPDATE spares SET state = 'made' WHERE id = %s", (sid,))
    return sid


def _unwanted(p: Platform, server: ServerRecord) -> list[uuid.UUID]:
    """The server's spares a create gave back, and those a crash left
    `making` (stale)."""
    with p.db.connection() as pconn:
        return [
            r[0]
            for r in pconn.execute(
                "SELECT id FROM spares WHERE server_id = %s AND (state = 'drop' "
                "OR (state = 'making' AND created_at < now() - %s::interval))",
                (server.id, _STALE),
            )
        ]


def _drop_unwanted(
    p: Platform, server: ServerRecord, conn: psycopg.Connection[Any]
) -> list[uuid.UUID]:
    """Drop the server's spares a create gave back, those a crash left
    `making` (stale), and earlier versions' spares: on the server, then
    their rows, then in the routers."""
    ids = _unwanted(p, server)
    for sid in ids:
        drop_on_server(conn, name=tenant_db_name(sid))
        log.info("dropped spare %s on %s (given back, or left unfinished)", sid, server.name)
    if ids:
        with p.db.connection() as pconn:
            pconn.execute("DELETE FROM spares WHERE id = ANY(%s)", (ids,))
        routing.publish(p, projects=ids)  # out of the routers too
    legacy = [
        r[0]
        for r in conn.execute(
            "SELECT datname FROM pg_catalog.pg_database WHERE datname LIKE %s "
            "UNION SELECT pg_catalog.regexp_replace(rolname, '_(rw|ro)$', '') "
            "FROM pg_catalog.pg_roles WHERE rolname LIKE %s",
            (_LEGACY_LIKE, _LEGACY_LIKE),
        )
    ]
    for name in legacy:
        drop_on_server(conn, name=name)
    for role in drop_gone_roles(conn):
        log.info("dropped role %s on %s: nothing depends on it any more", role, server.name)
    return ids


def spare_target(settings: Settings, server: str) -> int:
    """How many ready spares the server named `server` keeps: its own size
    if configured (PGFLEET_SPARE_DATABASES_BY_SERVER), else
    PGFLEET_SPARE_DATABASES."""
    return settings.spare_databases_by_server.get(server, settings.spare_databases)


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
    burst longer than the pool is served at the reserve's pace.

    What the last pass saw is this process's own memory, and passes move
    between processes (whichever takes the lock). A process that has no
    memory of this server, whose last attempt found another process at
    work here, or whose memory is older than its own rhythm explains (three
    heartbeats, or twice the time between its last two looks here: a pass
    that also visits a server that does not answer takes its connect
    timeout there) does not know whether creates are claiming, and above
    the reserve it only looks; the next pass decides. Taking an old count
    for the truth, a process whose last pass was during the first fill
    made spares in the middle of a burst; measuring age in heartbeats
    alone, a process whose passes were stretched by unreachable servers
    never refilled the one that answered."""
    made = 0
    # server id -> (ready count, when, time since this process's look before)
    seen: dict[int, tuple[int, float, float]] = p.component("spares_seen", dict)
    with p.servers.admin_connection(server) as conn:
        got = conn.execute("SELECT pg_try_advisory_lock(%s)", (_SPARE_LOCK,)).fetchone()
        if not (got and got[0]):
            seen.pop(server.id, None)  # another process works here: what we saw is old
            return 0
        try:
            _drop_unwanted(p, server, conn)
            if target:
                ensure_template(p, server, conn)
            ready = _ready(p, server)
            last = seen.get(server.id)
            age = time.monotonic() - last[1] if last else 0.0
            rhythm = 3 * p.settings.worker_heartbeat_s
            fresh = last is not None and age <= max(rhythm, 2 * last[2])
            # Not known: as if creates were claiming.
            claimed = ready < last[0] if fresh and last is not None else True
            # A pass makes at most `target`.
            while ready < target and made < target:
                if until is not None and time.monotonic() >= until:
                    break
                if reserve is not None and claimed and ready >= reserve:
                    break
                prepare_spare(p, server, conn)
                made += 1
                p.metrics.spares_made.labels(server.region).inc()
                now = _ready(p, server)
                claimed = now <= ready  # this one made, and one taken meanwhile
                ready = now
            looked = time.monotonic()
            seen[server.id] = (ready, looked, looked - last[1] if last else 0.0)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_SPARE_LOCK,))
    # With the admin session given back: reading the verifiers takes one.
    _finish(p, server)
    return made


def _ready(p: Platform, server: ServerRecord) -> int:
    """The server's spares ready, or whole and ready once this pass has told
    the routers."""
    with p.db.connection() as pconn:
        row = pconn.execute(
            "SELECT count(*) FROM spares WHERE server_id = %s AND state IN ('made', 'ready')",
            (server.id,),
        ).fetchone()
    return int(row[0]) if row else 0


def _finish(p: Platform, server: ServerRecord) -> None:
    """The server's `made` spares (this pass's, and any a crash left)
    published to the routers (one edit and one reload for them all), then
    ready: a create may take a spare only once the routers have its route
    and its verifiers. If its server's verifiers could not be read, they
    stay `made` for the next pass. A router that could not be reached is
    brought up to date by the periodic sync, as after any publish."""
    with p.db.connection() as pconn:
        made = [
            r[0]
            for r in pconn.execute(
                "SELECT id FROM spares WHERE server_id = %s AND state = 'made'", (server.id,)
            )
        ]
    if not made:
        return
    out = routing.publish(p, projects=made)
    if out.servers_unreachable:
        return
    with p.db.connection() as pconn:
        pconn.execute(
            "UPDATE spares SET state = 'ready' WHERE id = ANY(%s) AND state = 'made'", (made,)
        )


def spare_reserve(target: int) -> int:
    """The ready spares a refill keeps even while creates claim them."""
    return max(1, target // 4) if target else 0


def drop_spares(p: Platform, server: ServerRecord) -> int:
    """Drop every spare on `server` (a server leaving service), once no
    refill is making one there: on the server, then their rows, then in
    the routers."""
    with p.servers.admin_connection(server) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_SPARE_LOCK,))
        try:
            with p.db.connection() as pconn:
                ids = [
                    r[0]
                    for r in pconn.execute(
                        "SELECT id FROM spares WHERE server_id = %s", (server.id,)
                    )
                ]
            for sid in ids:
                drop_on_server(conn, name=tenant_db_name(sid))
            with p.db.connection() as pconn:
                pconn.execute("DELETE FROM spares WHERE id = ANY(%s)", (ids,))
            _drop_unwanted(p, server, conn)  # earlier versions' spares
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_SPARE_LOCK,))
    if ids:
        routing.publish(p, projects=ids)
    return len(ids)


@REGISTRY.every("refill_spares", lambda s: s.worker_heartbeat_s)
def refill_all(platform: Platform) -> None:
    """Every server's prepared spares back up to its target, a pass at a
    time: each pass lasts about one heartbeat and visits the servers in a
    random order, so no server always waits behind another."""
    s = platform.settings
    until = time.monotonic() + max(1.0, s.worker_heartbeat_s)
    servers = [(spare_target(s, srv.name), srv) for srv in platform.servers.all(enabled_only=True)]
    random.shuffle(servers)
    for target, server in servers:
        try:
            # A server keeping none still has its given-back spares dropped.
            if not target and not _unwanted(platform, server):
                continue
            refill_spares(platform, server, target, until=until, reserve=spare_reserve(target))
        except (RegionUnavailable, psycopg.OperationalError) as e:
            log.debug("spares for %s not refilled: %s", server.name, e)
        except (PgfleetError, psycopg.Error, OSError) as e:  # not an outage: say it
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
                    float(spare_target(platform.settings, srv.name)),
                )
                for srv in platform.servers.all(enabled_only=True)
            ]
        }

    platform.metrics.add_state(read)
