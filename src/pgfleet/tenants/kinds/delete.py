"""`delete`: block, drop_database (point of no return), drop_roles, finish.
The row stays, `deleted`, for the record."""

from __future__ import annotations

import logging
from typing import cast

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
from pgfleet.tenants.server import drop_database, role_exists

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
        if drop_database(conn, name):
            ctx.state.setdefault("actions", []).append("drop database")


def _drop_roles(ctx: OpContext) -> None:
    p = ctx.platform
    server = server_of(p, tenant(p, ctx.tenant_id))
    if server is None:
        return
    name = tenant_db_name(ctx.tenant_id)
    with project_admin(p, server, ctx.tenant_id) as conn:
        for i, role in enumerate((*login_role_names(name), name)):
            if role_exists(conn, role):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
                ctx.state.setdefault("actions", []).append(f"drop role {role}")
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
