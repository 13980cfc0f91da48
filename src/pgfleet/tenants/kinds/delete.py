"""`delete`: block, drop_database (point of no return), drop_roles, finish.
The row stays, `deleted`, for the record."""

from __future__ import annotations

import logging
import uuid
from typing import Any, cast

import psycopg
from psycopg import sql

from pgfleet.operations.failpoints import failpoint
from pgfleet.operations.registry import OpContext, OperationKind, Step, register
from pgfleet.tenants import store
from pgfleet.tenants.kinds.common import (
    alter_login_roles,
    end_sessions,
    login_roles,
    project_admin,
    reached,
    route,
    route_after_undo,
    server_of,
    set_status,
    tenant,
)
from pgfleet.tenants.naming import login_role_names, tenant_db_name
from pgfleet.tenants.server import drop_database, drop_role

log = logging.getLogger(__name__)


def _block(ctx: OpContext) -> None:
    set_status(ctx.platform, ctx.tenant_id, "deleting")


def _drop_database(ctx: OpContext) -> None:
    p = ctx.platform
    server = server_of(p, tenant(p, ctx.tenant_id))
    if server is None:
        return
    name = tenant_db_name(ctx.tenant_id)
    with project_admin(p, server, ctx.tenant_id) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if "restore_point" not in ctx.state and exists:
            ctx.state.update(mark_before_drop(conn, ctx.tenant_id))
        if drop_database(conn, name):
            ctx.state.setdefault("actions", []).append("drop database")


def mark_before_drop(conn: psycopg.Connection[Any], tid: uuid.UUID) -> dict[str, Any]:
    """A named restore point just before the drop, so that a deleted
    project's data can be recovered from the server's archive exactly as
    its owner left it (undelete). DROP DATABASE writes WAL that is not a
    commit (it marks the database invalid in place) and recovery to a time
    replays up to the next commit: a time target could land past that
    mark, a named point cannot. The commit in between makes every time
    before `restore_point_at` stop before the point."""
    row = conn.execute(
        "SELECT pg_catalog.clock_timestamp(), (SELECT oid FROM pg_catalog.pg_database "
        "WHERE datname = %s)",
        (tenant_db_name(tid),),
    ).fetchone()
    assert row is not None
    conn.execute("SELECT pg_catalog.txid_current()")
    point = f"pgfleet-drop-{tid}"
    if conn.execute("SELECT pg_catalog.current_setting('wal_level')").fetchone() != ("minimal",):
        conn.execute("SELECT pg_catalog.pg_create_restore_point(%s)", (point,))
    return {
        "restore_point": point,
        "restore_point_at": row[0].isoformat(),
        "database_oid": int(row[1]) if row[1] is not None else None,
    }


def _drop_roles(ctx: OpContext) -> None:
    p = ctx.platform
    server = server_of(p, tenant(p, ctx.tenant_id))
    if server is None:
        return
    name = tenant_db_name(ctx.tenant_id)
    with project_admin(p, server, ctx.tenant_id) as conn:
        for i, role in enumerate((*login_role_names(name), name)):
            done = drop_role(conn, role)  # never fails on another tenant's grant
            if done:
                ctx.state.setdefault("actions", []).append(done)
            if i == 0:
                failpoint("delete.drop_roles.mid")


def _finish(ctx: OpContext) -> None:
    set_status(ctx.platform, ctx.tenant_id, "deleted", paused=False, deleted=True)


def _restore(ctx: OpContext, reason: str | None = None) -> None:
    # Recorded with the operation when it was asked for: durable from the start.
    previous = ctx.params.get("previous_status")
    if previous in store.STATUSES:
        set_status(ctx.platform, ctx.tenant_id, cast(store.Status, previous))
        route_after_undo(ctx)


def _failed(ctx: OpContext, reason: str) -> None:
    # Once the drop has started (now or before a crash) the database may be
    # gone: the project cannot go back to what it was.
    if reached(ctx, _DROP_POSITION):
        set_status(ctx.platform, ctx.tenant_id, "failed", error=f"delete failed: {reason}"[:500])
        # A project being deleted must not stay reachable: its credentials
        # stop working even though what is left could not be dropped (the
        # reconciler reports it; deleting again finishes the job).
        try:
            alter_login_roles(ctx.platform, ctx.tenant_id, sql.SQL("NOLOGIN"))
            end_sessions(ctx.platform, ctx.tenant_id, login_roles(ctx.tenant_id))
        except Exception as e:  # the server may be what failed; the reconciler follows up
            log.warning(
                "delete of %s failed and its roles could not be locked: %s", ctx.tenant_id, e
            )
    else:
        _restore(ctx)


DELETE = register(
    OperationKind(
        name="delete",
        description="drop the project's database and roles; the row stays for the audit",
        steps=(
            Step("block", _block),
            # Out of every router: its clients' connections there close.
            Step("route", route),
            Step("drop_database", _drop_database, final=True),
            Step("drop_roles", _drop_roles),
            Step("finish", _finish),
        ),
        on_failure=_failed,
        on_cancel=_restore,
    )
)

_DROP_POSITION = DELETE.step_position("drop_database") or 0
