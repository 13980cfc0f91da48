"""What the tenants' operation kinds share: the project's row and server,
its status (through the store's transitions), its login roles."""

from __future__ import annotations

import logging
import uuid
from contextlib import AbstractContextManager
from typing import Any

import psycopg
from psycopg import sql

from pgfleet.fleet.registry import ServerRecord
from pgfleet.operations.registry import OpContext
from pgfleet.platform.core import Platform
from pgfleet.tenants import routing, store
from pgfleet.tenants.connections import DatabasePlatformClient
from pgfleet.tenants.naming import login_role_names, project_roles_of, tenant_db_name
from pgfleet.tenants.server import role_exists

log = logging.getLogger(__name__)


def tenant(p: Platform, tid: uuid.UUID) -> store.Tenant:
    with p.db.connection() as conn:
        return store.require(conn, tid)


def server_of(p: Platform, row: store.Tenant) -> ServerRecord | None:
    return None if row.server_id is None else p.servers.get(row.server_id)


def set_status(
    p: Platform,
    tid: uuid.UUID,
    status: store.Status,
    *,
    error: str | None = None,
    paused: bool | None = None,
    deleted: bool = False,
) -> str:
    """The project's status changed (store.transition), and this process's
    cached credentials of it forgotten. Returns the status it had."""
    with p.db.connection() as conn:
        old = store.transition(conn, tid, status, error=error, paused=paused, deleted=deleted)
    DatabasePlatformClient.of(p).forget(tid)
    return old


def project_admin(
    p: Platform, server: ServerRecord, tid: uuid.UUID
) -> AbstractContextManager[psycopg.Connection[Any]]:
    """An admin connection for work on project `tid`'s objects: a session of
    the project's own roles that blocks it is ended (see the registry)."""
    return p.servers.admin_connection(server, evict=project_roles_of(tid))


def login_roles(tid: uuid.UUID) -> list[str]:
    return login_role_names(tenant_db_name(tid))


def alter_login_roles(p: Platform, tid: uuid.UUID, clause: sql.Composable) -> None:
    server = server_of(p, tenant(p, tid))
    if server is None:
        return
    with project_admin(p, server, tid) as conn, conn.transaction():
        for role in login_roles(tid):
            if role_exists(conn, role):
                conn.execute(sql.SQL("ALTER ROLE {} {}").format(sql.Identifier(role), clause))


def end_sessions(p: Platform, tid: uuid.UUID, roles: list[str]) -> int:
    server = server_of(p, tenant(p, tid))
    if server is None:
        return 0
    with project_admin(p, server, tid) as conn:
        ended = conn.execute(
            "SELECT count(pg_catalog.pg_terminate_backend(pid)) "
            "FROM pg_catalog.pg_stat_activity "
            "WHERE usename = ANY(%s) AND pid <> pg_catalog.pg_backend_pid()",
            (roles,),
        ).fetchone()
    return int(ended[0]) if ended else 0


def reached(ctx: OpContext, position: int) -> bool:
    """Has step `position` of this operation started, in any attempt? (The
    state in `ctx` only has what finished steps recorded; a crash mid-step
    leaves no trace there.) A skipped step never started."""
    with ctx.platform.db.connection() as conn:
        row = conn.execute(
            "SELECT 1 FROM operation_steps WHERE operation_id = %s AND position >= %s "
            "AND status <> 'skipped' LIMIT 1",
            (ctx.op.id, position),
        ).fetchone()
    return row is not None


def route(ctx: OpContext) -> None:
    """A step: every router told what changed (tenants/routing.py). A router
    that is down is not an error; the periodic sync brings it up to date."""
    ctx.state["routers"] = routing.publish(ctx.platform, projects=[ctx.tenant_id]).reloaded


def route_after_undo(ctx: OpContext) -> None:
    """What an undo put back, told to the routers at once (not at the next
    sync). Best effort: an undo must not fail on a router."""
    try:
        routing.publish(ctx.platform, projects=[ctx.tenant_id])
    except Exception as e:  # the periodic sync follows up
        log.warning("routers not told of %s's undo: %s", ctx.tenant_id, e)
