"""The lifecycle: `pause` (mark, block_logins, end_sessions), `resume`
(allow_logins, privileges, mark) and `change_plan` (limits, record)."""

from __future__ import annotations

from dataclasses import replace

from psycopg import sql

from pgfleet.errors import NoCapacity
from pgfleet.operations.registry import OpContext, OperationKind, Step, register
from pgfleet.regions import Placement, PlacementPolicy, choose_server, get_plan
from pgfleet.tenants import store
from pgfleet.tenants.connections import DatabasePlatformClient
from pgfleet.tenants.kinds.common import (
    alter_login_roles,
    end_sessions,
    login_roles,
    project_admin,
    route,
    route_after_undo,
    server_of,
    set_status,
    tenant,
)
from pgfleet.tenants.provisioning import converge_target_on_server, prepare_provision
from pgfleet.tenants.server import role_exists


def _pause_mark(ctx: OpContext) -> None:
    set_status(ctx.platform, ctx.tenant_id, "paused", paused=True)


def _pause_block(ctx: OpContext) -> None:
    alter_login_roles(ctx.platform, ctx.tenant_id, sql.SQL("NOLOGIN"))


def _pause_end_sessions(ctx: OpContext) -> None:
    ctx.state["sessions_ended"] = ctx.state.get("sessions_ended", 0) + end_sessions(
        ctx.platform, ctx.tenant_id, login_roles(ctx.tenant_id)
    )


def _pause_undo(ctx: OpContext, reason: str | None = None) -> None:
    alter_login_roles(ctx.platform, ctx.tenant_id, sql.SQL("LOGIN"))
    set_status(ctx.platform, ctx.tenant_id, "active", paused=False)
    route_after_undo(ctx)


PAUSE = register(
    OperationKind(
        name="pause",
        description="refuse new connections and end the open ones; data stays",
        steps=(
            Step("mark", _pause_mark),
            Step("block_logins", _pause_block),
            Step("end_sessions", _pause_end_sessions),
            # Out of every router: its clients' connections there close.
            Step("route", route),
        ),
        on_failure=_pause_undo,
        on_cancel=_pause_undo,
    )
)


def _resume_allow(ctx: OpContext) -> None:
    """The roles as an active project's: LOGIN, and whatever else drifted
    while it was paused (a password its tenant changed, say) put back."""
    t = replace(prepare_provision(ctx.platform, ctx.tenant_id), status="active")
    ctx.state.setdefault("actions", []).extend(converge_target_on_server(ctx.platform, t, "roles"))


def _resume_privileges(ctx: OpContext) -> None:
    """What a paused project's convergence left for later (its roles could
    not log in): the privileges inside its database, as its own role."""
    t = prepare_provision(ctx.platform, ctx.tenant_id)
    t = replace(t, status="active")
    ctx.state.setdefault("actions", []).extend(
        converge_target_on_server(ctx.platform, t, "privileges")
    )


def _resume_mark(ctx: OpContext) -> None:
    set_status(ctx.platform, ctx.tenant_id, "active", paused=False)


def _resume_undo(ctx: OpContext, reason: str | None = None) -> None:
    alter_login_roles(ctx.platform, ctx.tenant_id, sql.SQL("NOLOGIN"))
    route_after_undo(ctx)


RESUME = register(
    OperationKind(
        name="resume",
        description="accept connections again",
        steps=(
            Step("allow_logins", _resume_allow),
            Step("privileges", _resume_privileges),
            Step("mark", _resume_mark),
            Step("route", route),
        ),
        on_failure=_resume_undo,
        on_cancel=_resume_undo,
    )
)


def _plan_limits(ctx: OpContext) -> None:
    plan = get_plan(ctx.params["plan"])
    p = ctx.platform
    row = tenant(p, ctx.tenant_id)
    server = server_of(p, row)
    if server is None:
        return
    timeout = f"{plan.statement_timeout_ms}ms"
    with project_admin(p, server, ctx.tenant_id) as conn, conn.transaction():
        for role in login_roles(ctx.tenant_id):
            if role_exists(conn, role):
                ident = sql.Identifier(role)
                conn.execute(
                    sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(
                        ident, sql.Literal(plan.connection_limit)
                    )
                )
                conn.execute(
                    sql.SQL("ALTER ROLE {} SET statement_timeout = {}").format(
                        ident, sql.Literal(timeout)
                    )
                )


def _plan_record(ctx: OpContext) -> None:
    p = ctx.platform
    plan = get_plan(ctx.params["plan"])
    row = tenant(p, ctx.tenant_id)
    current = row.hosted_region or ""
    try:
        wanted_region = choose_server(
            policy=PlacementPolicy(p.settings.placement),
            region=row.region or p.settings.default_region,
            plan=plan.id,
            servers=p.servers.loads(),
            default_region=p.settings.default_region,
        )
    except NoCapacity as e:  # advice only: a full fleet does not stop a plan change
        wanted_region = Placement(0, "", current, f"no placement possible now: {e.message}")
    with p.db.connection() as conn:
        store.set_plan(conn, ctx.tenant_id, plan.id)
    DatabasePlatformClient.of(p).forget(ctx.tenant_id)
    wanted = wanted_region
    ctx.state["plan"] = plan.id
    ctx.state["previous_plan"] = ctx.params.get("previous_plan")
    ctx.state["connection_limit"] = plan.connection_limit
    ctx.state["statement_timeout_ms"] = plan.statement_timeout_ms
    ctx.state["placement"] = {
        "policy": p.settings.placement,
        "hosted_region": current,
        "wanted_region": wanted.hosted_region,
        "would_move": wanted.hosted_region != current,
        "reason": wanted.reason,
        "note": (
            f"under the {p.settings.placement} policy this plan is hosted in "
            f"{wanted.hosted_region}; the project stays in {current} until region moves exist"
            if wanted.hosted_region != current
            else "no move needed"
        ),
    }


def _plan_undo(ctx: OpContext, reason: str | None = None) -> None:
    previous = ctx.params.get("previous_plan")
    if previous:
        undo = OpContext(ctx.platform, replace(ctx.op, params={"plan": previous}))
        _plan_limits(undo)
        route_after_undo(ctx)


CHANGE_PLAN = register(
    OperationKind(
        name="change_plan",
        description="apply a plan's limits (connections, statement timeout) and record it",
        steps=(
            Step("limits", _plan_limits),
            Step("record", _plan_record),
            Step("route", route),
        ),
        on_failure=_plan_undo,
        on_cancel=_plan_undo,
    )
)
