"""`provision`: place, roles, database, privileges, activate."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from pgfleet.errors import PgfleetError, PlatformUnavailable, RegionStayedDown, RegionUnavailable
from pgfleet.operations.registry import OpContext, OperationKind, Step, register
from pgfleet.tenants import routing, spares, store
from pgfleet.tenants.kinds.common import (
    project_admin,
    route,
    route_after_undo,
    server_of,
    set_status,
    tenant,
)
from pgfleet.tenants.naming import tenant_db_name
from pgfleet.tenants.provisioning import (
    ProvisionTarget,
    activate,
    converge_target_on_server,
    prepare_provision,
)
from pgfleet.tenants.server import drop_on_server

log = logging.getLogger(__name__)


def _target(ctx: OpContext) -> ProvisionTarget:
    """The project's target, read once per run: nothing else changes the
    project while its operation runs (one operation per project)."""
    t = ctx.scratch.get("target")
    if t is None:
        t = ctx.scratch["target"] = prepare_provision(ctx.platform, ctx.tenant_id)
    assert isinstance(t, ProvisionTarget)
    return t


def _place(ctx: OpContext) -> None:
    t = _target(ctx)
    ctx.state.update(server=t.server.name, hosted_region=t.server.region, actions=[])


# A create not asked to wait for its region (wait_for_region) gives up on a
# server it cannot reach after this long, and is undone: its caller gets a
# 503 in seconds, not when the operation's deadline passes (2 minutes of
# retries, seen). The health checks, which make a create refuse a down
# region at once, may take one interval (30 s) to notice.
UNREACHABLE_GIVE_UP_S = 10.0


def _unreachable(e: Exception) -> bool:
    """Whether `e` says the server could not be reached (not that a
    statement failed there)."""
    if isinstance(e, (RegionUnavailable, PoolTimeout)):
        return True
    if isinstance(e, psycopg.OperationalError):
        # No SQLSTATE: libpq's own connection failure. 08: connection
        # exceptions; 57P01-57P03: the server shutting down or starting.
        state = e.sqlstate
        return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")
    return False


def _claimed(ctx: OpContext) -> bool:
    """Whether the roles step claimed a prepared spare: the database and its
    privileges are then in place, and those steps are skipped."""
    return spares.CLAIMED in ctx.state.get("actions", ())


def _routed_ahead(ctx: OpContext) -> bool:
    """Whether the project was routed with its spare: the route step is
    then skipped, unless its plan's route is not a spare's. (From the
    state and the params only, as a skip must be: the plan is the one the
    create asked for, and nothing changes it while the create runs.)"""
    return _claimed(ctx) and routing.spare_route_fits(ctx.params.get("plan"))


def _part(part: str) -> Callable[[OpContext], None]:
    def run(ctx: OpContext) -> None:
        t = _target(ctx)
        try:
            made = converge_target_on_server(ctx.platform, t, part)
        except Exception as e:
            if not _unreachable(e) or ctx.params.get("wait_for_region"):
                raise
            since = ctx.scratch.setdefault("unreachable_since", time.monotonic())
            waited = time.monotonic() - since
            if waited < UNREACHABLE_GIVE_UP_S:
                raise  # retried: a restart takes a few seconds
            what = "restore" if ctx.op.type == "restore" else "create"
            raise RegionStayedDown(
                f"region {t.server.region} is unavailable: server {t.server.name} could "
                f"not be reached for {waited:.0f} s, so the {what} was given up; try "
                "again later, or ask with wait_for_region=true to queue it until the "
                "server is back",
                region=t.server.region,
                server=t.server.name,
            ) from e
        ctx.scratch.pop("unreachable_since", None)
        ctx.state.setdefault("actions", []).extend(made)

    return run


def _activate(ctx: OpContext) -> None:
    p = ctx.platform
    t = _target(ctx)
    activate(p, t, tuple(ctx.state.get("actions", ())))
    p.metrics.provisions.labels(t.server.region, "ok").inc()
    # From the request (the operation's creation) to credentials that work.
    took = datetime.now(UTC) - ctx.op.created_at
    p.metrics.provision_duration.labels(t.server.region).observe(took.total_seconds())


def _route(ctx: OpContext) -> None:
    """The routers told (kinds.common.route). Past `activate` the project is
    its caller's: a failure here that no retry mends (the routers' files
    cannot be written, say) is kept in the result, `route_error`, and left
    to the routers' periodic sync (which /health reports while it lasts),
    rather than failing a create whose project exists and works directly.
    An outage is retried, as in any step."""
    try:
        route(ctx)
    except (RegionUnavailable, PlatformUnavailable):
        raise
    except (PgfleetError, OSError) as e:
        ctx.state["route_error"] = str(e)[:500]
        log.warning("operation %s: routers not told (%s); the sync follows up", ctx.op.id, e)


def _undo(ctx: OpContext, reason: str = "cancelled") -> None:
    """Drop whatever the steps made; the tenant row keeps the story. If the
    server cannot be reached to clean up, a project made from a prepared
    spare gives it back, and the next refill of that server drops whatever
    the claim left there (a spare is made under the project's own names);
    any other stays `failed` for the reconciler.

    A project that became active is never undone: its credentials may be
    out (a step after `activate`, the route, failed for good; the routers'
    sync brings them up to date)."""
    p = ctx.platform
    row = tenant(p, ctx.tenant_id)
    if row.status == "active":
        log.warning(
            "operation %s failed after its project became active: nothing undone", ctx.op.id
        )
        return
    server = server_of(p, row)
    try:
        if server is not None:
            with project_admin(p, server, ctx.tenant_id) as conn:
                drop_on_server(conn, name=tenant_db_name(ctx.tenant_id))
    except Exception:
        if not (row.info.get("spare") and row.server_id is not None):
            set_status(p, ctx.tenant_id, "failed", error=reason[:500])
            raise
        with p.db.connection() as conn:
            spares.give_back(conn, ctx.tenant_id, row.server_id, row.info)
    set_status(p, ctx.tenant_id, "deleted", error=reason[:500], deleted=True)
    if row.info.get("spare"):
        route_after_undo(ctx)  # it was routed ahead with its spare
    hosted = server.region if server is not None else row.hosted_region or ""
    p.metrics.provisions.labels(hosted, "failed").inc()


def _cancelled_unstarted(conn: psycopg.Connection[Any], tenant_id: uuid.UUID) -> None:
    """A provision cancelled before it started: the project is deleted at
    once. Nothing of it exists on a server, unless it took a prepared spare:
    that goes back to be dropped by the next refill of its server (and then
    leaves the routers)."""
    row = store.get(conn, tenant_id)
    if row is not None and row.server_id is not None and row.info.get("spare"):
        spares.give_back(conn, tenant_id, row.server_id, row.info)
    store.transition(
        conn,
        tenant_id,
        "deleted",
        error="provisioning was cancelled before it started",
        deleted=True,
    )


PROVISION = register(
    OperationKind(
        name="provision",
        description="create the project's roles and database on its regional server",
        steps=(
            Step("place", _place),
            Step("roles", _part("roles")),
            Step("database", _part("database"), skip=_claimed),
            Step("privileges", _part("privileges"), skip=_claimed),
            # Once credentials are handed out the database is never undone.
            Step("activate", _activate, final=True),
            Step("route", _route, skip=_routed_ahead),
        ),
        on_failure=lambda ctx, reason: _undo(ctx, f"provisioning failed: {reason}"),
        on_cancel=lambda ctx: _undo(ctx, "provisioning was cancelled"),
        on_cancel_unstarted=_cancelled_unstarted,
    )
)


# What other domains' kinds reuse (a restore makes its new project the same
# way): the steps that build the project, those that open it, and the undo.
BUILD_STEPS = PROVISION.steps[:4]
OPEN_STEPS = PROVISION.steps[4:]
undo_provision = _undo
cancelled_unstarted = _cancelled_unstarted
