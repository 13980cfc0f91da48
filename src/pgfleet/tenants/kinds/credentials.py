"""Credentials: `rotate_password` (generate, apply: the point of no return,
store, schedule_expiry) and `expire_credentials`, and the job that starts
the latter when a rotation's overlap window ends."""

from __future__ import annotations

import uuid
from typing import Any

from psycopg import sql

from pgfleet.crypto import generate_password
from pgfleet.errors import Conflict
from pgfleet.operations.registry import REGISTRY, OpContext, OperationKind, Step, register
from pgfleet.operations.runtime import OperationsRuntime
from pgfleet.operations.store import audit, insert_operation
from pgfleet.platform.core import Platform
from pgfleet.regions import get_plan
from pgfleet.tenants import routing, store
from pgfleet.tenants.connections import DatabasePlatformClient
from pgfleet.tenants.kinds.common import (
    end_sessions,
    login_roles,
    project_admin,
    reached,
    server_of,
    tenant,
)
from pgfleet.tenants.naming import (
    alt_role_name,
    main_role_name,
    ro_role_name,
    rw_role_name,
    tenant_db_name,
)
from pgfleet.tenants.server import ensure_alternate, role_exists, scram_verifier
from pgfleet.tenants.sql.auth import AUTH_CHANNEL

# The job's name is kept as it was, so expiries queued before an upgrade run.
EXPIRE_TASK = "pgfleet.expire_credentials"


@REGISTRY.job(EXPIRE_TASK, retry_on=(Conflict,))
def start_expiry(platform: Platform, *, tenant_id: str, roles: list[str]) -> str:
    """The overlap window of a rotation ended: start the operation that
    expires the old credentials (retried while the project is busy: 409)."""
    tid = uuid.UUID(tenant_id)
    with platform.db.connection() as conn, conn.transaction():
        row = store.get(conn, tid)
        if row is None or row.status in ("deleted", "deleting"):
            return "project gone"
        op_id = insert_operation(
            conn,
            type="expire_credentials",
            tenant_id=tid,
            owner_id=row.owner_id,
            actor="pgfleet",
            params={"roles": roles},
            deadline_s=platform.settings.operation_deadline_s,
        )
        audit(
            conn,
            actor="pgfleet",
            action="project.expire_credentials",
            tenant_id=tid,
            operation_id=op_id,
            details={"roles": roles, "reason": "rotation overlap window ended"},
        )
    OperationsRuntime.of(platform).defer(op_id)
    return str(op_id)


def schedule_expiry(
    platform: Platform, tenant_id: uuid.UUID, roles: list[str], after_s: int, *, key: str
) -> str:
    """Queue the end of an overlap window; returns when it is due (ISO 8601)."""
    return OperationsRuntime.of(platform).defer_job(
        EXPIRE_TASK, after_s=after_s, key=key, tenant_id=str(tenant_id), roles=list(roles)
    )


_PENDING = {"rw": "pending_password_enc", "ro": "pending_ro_password_enc"}
_PENDING_USER = {"rw": "pending_user", "ro": "pending_ro_user"}
_CURRENT = {"rw": "password_enc", "ro": "ro_password_enc"}
_USER = {"rw": "user", "ro": "ro_user"}


def _roles_param(ctx: OpContext) -> list[str]:
    which = ctx.params.get("role", "all")
    return ["rw", "ro"] if which == "all" else [which]


def _update_info(p: Platform, tid: uuid.UUID, info: dict[str, Any]) -> None:
    with p.db.connection() as conn:
        store.set_connection_info(conn, tid, info)


def credential_users(info: dict[str, Any], tid: uuid.UUID) -> set[str]:
    """The login roles a project's credentials use (current and pending), and
    those whose overlap window is still to be scheduled."""
    users = {_current_user(info, m, tid) for m in ("rw", "ro")}
    users |= {str(info[k]) for k in _PENDING_USER.values() if info.get(k)}
    return users | set(info.get("expire_after_overlap", []))


def _current_user(info: dict[str, Any], mode: str, tid: uuid.UUID) -> str:
    name = tenant_db_name(tid)
    default = rw_role_name(name) if mode == "rw" else ro_role_name(name)
    return str(info.get(_USER[mode]) or default)


def _rotate_generate(ctx: OpContext) -> None:
    """New passwords, stored encrypted before any server sees them, and the
    login role each goes to: the same one, or with an overlap window the
    other of the main/alternate pair, so the old credential keeps working."""
    p = ctx.platform
    info = dict(tenant(p, ctx.tenant_id).info)
    overlap = int(ctx.params.get("overlap_s") or 0)
    changed = False
    for mode in _roles_param(ctx):
        if info.get(_PENDING[mode]):
            continue
        current = _current_user(info, mode, ctx.tenant_id)
        target = current
        if overlap:
            main = main_role_name(current)
            target = alt_role_name(main) if current == main else main
        info[_PENDING[mode]] = p.secrets.encrypt(generate_password())
        info[_PENDING_USER[mode]] = target
        changed = True
    if changed:
        _update_info(p, ctx.tenant_id, info)


def _rotate_apply(ctx: OpContext) -> None:
    p = ctx.platform
    row = tenant(p, ctx.tenant_id)
    server = server_of(p, row)
    assert server is not None
    info = row.info
    plan = get_plan(row.plan_type or "free")
    targets: list[str] = []
    with project_admin(p, server, ctx.tenant_id) as conn, conn.transaction():
        # Every pending password, including one a failed rotation left
        # behind: `store` then stores them all, so what is stored is always
        # what the server has.
        for mode in ("rw", "ro"):
            pending = info.get(_PENDING[mode])
            if not pending:
                continue  # already stored by a previous run of `store`
            user = str(info[_PENDING_USER[mode]])
            targets.append(user)
            password = p.secrets.decrypt(pending)
            if user.endswith("_alt"):
                ensure_alternate(
                    conn,
                    main_role_name(user),
                    password,
                    connection_limit=plan.connection_limit,
                    statement_timeout_ms=plan.statement_timeout_ms,
                    login=row.status != "paused",
                    actions=[],
                )
            else:
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(user), sql.Literal(scram_verifier(conn, user, password))
                    )
                )
    # Sessions of a role that just got a new password logged in with an old
    # one (nobody has the new one yet: it is handed out after `store`): they
    # end, so a leaked password stops working now, not at the next login, and
    # a session opened with it cannot set a password of its own choosing. With
    # an overlap window the target is the other role of the pair, whose old
    # password already expired; the current credential's sessions go on.
    if targets:
        ctx.state["sessions_ended"] = end_sessions(p, ctx.tenant_id, targets)


def _rotate_store(ctx: OpContext) -> None:
    p = ctx.platform
    info = dict(tenant(p, ctx.tenant_id).info)
    expire = list(ctx.state.get("expire", []))
    for mode in ("rw", "ro"):
        if info.get(_PENDING[mode]):
            old_user = _current_user(info, mode, ctx.tenant_id)
            new_user = str(info.pop(_PENDING_USER[mode]))
            info[_CURRENT[mode]] = info.pop(_PENDING[mode])
            info[_USER[mode]] = new_user
            if mode == "rw":
                info.pop("password_chosen", None)  # pgfleet made the new one
            if old_user != new_user and old_user not in expire:
                expire.append(old_user)
    # Kept with the credentials, in the same write, so a crash before the
    # expiry is scheduled cannot forget it.
    if expire:
        info["expire_after_overlap"] = sorted(
            set(info.get("expire_after_overlap", [])) | set(expire)
        )
    _update_info(p, ctx.tenant_id, info)
    DatabasePlatformClient.of(p).forget(ctx.tenant_id)
    ctx.state["rotated"] = _roles_param(ctx)
    ctx.state["expire"] = expire


def _rotate_route(ctx: OpContext) -> None:
    """The routers get the new verifiers, and the clients connected through
    them as the roles that just got a new password (logged in with an old
    one) end, as their sessions on the server did (see routing.publish)."""
    info = tenant(ctx.platform, ctx.tenant_id).info
    got_new = [_current_user(info, m, ctx.tenant_id) for m in _roles_param(ctx)]
    ends = [(ctx.tenant_id, got_new)]
    ctx.state["routers"] = routing.publish(ctx.platform, end_clients_of=ends).reloaded


def _rotate_schedule_expiry(ctx: OpContext) -> None:
    """With an overlap window, the old credentials stop working when it ends:
    a job then starts an `expire_credentials` operation."""
    p = ctx.platform
    info = dict(tenant(p, ctx.tenant_id).info)
    roles = list(info.get("expire_after_overlap", []))
    if not roles:
        return
    overlap = int(ctx.params.get("overlap_s") or 0)
    at = schedule_expiry(p, ctx.tenant_id, roles, overlap, key=str(ctx.op.id))
    info.pop("expire_after_overlap", None)
    _update_info(p, ctx.tenant_id, info)
    ctx.state["expire"] = roles
    ctx.state["old_credentials_expire_at"] = at


def _rotate_failed(ctx: OpContext, reason: str) -> None:
    """Before `apply` the new passwords are dropped. After it, the server may
    already have them: they stay pending, and the next rotation applies and
    stores them (its `generate` keeps pending passwords)."""
    if not reached(ctx, 1):
        _rotate_discard(ctx)


def _rotate_discard(ctx: OpContext, reason: str | None = None) -> None:
    p = ctx.platform
    info = dict(tenant(p, ctx.tenant_id).info)
    keys = [*_PENDING.values(), *_PENDING_USER.values()]
    if any(k in info for k in keys):
        for k in keys:
            info.pop(k, None)
        _update_info(p, ctx.tenant_id, info)


ROTATE = register(
    OperationKind(
        name="rotate_password",
        description="give the project's login roles new passwords",
        steps=(
            Step("generate", _rotate_generate),
            Step("apply", _rotate_apply, final=True),
            Step("store", _rotate_store),
            Step("route", _rotate_route),
            Step("schedule_expiry", _rotate_schedule_expiry),
        ),
        on_failure=_rotate_failed,
        on_cancel=_rotate_discard,
    )
)


def _expire(ctx: OpContext) -> None:
    """The old credentials of an overlapping rotation stop working: the
    password goes (an alternate also loses LOGIN). A role that is in use
    again by now (a later rotation moved back to it) is left alone."""
    p = ctx.platform
    row = tenant(p, ctx.tenant_id)
    server = server_of(p, row)
    if server is None:
        return
    info = row.info
    in_use = {_current_user(info, m, ctx.tenant_id) for m in ("rw", "ro")}
    expired = []
    with project_admin(p, server, ctx.tenant_id) as conn, conn.transaction():
        for role in ctx.params.get("roles", []):
            if role in in_use or role not in login_roles(ctx.tenant_id):
                continue
            if role_exists(conn, role):
                clause = "NOLOGIN PASSWORD NULL" if role.endswith("_alt") else "PASSWORD NULL"
                conn.execute(
                    sql.SQL("ALTER ROLE {} {}").format(sql.Identifier(role), sql.SQL(clause))
                )
                expired.append(role)
    # Their sessions logged in with the password that just went.
    if expired:
        ctx.state["sessions_ended"] = end_sessions(p, ctx.tenant_id, expired)
        # The project's row does not change, so say it: logins the API
        # processes remember as verified (the HTTP driver's) are dropped.
        with p.db.connection() as pconn:
            pconn.execute("SELECT pg_notify(%s, %s)", (AUTH_CHANNEL, f"t:{ctx.tenant_id}"))
    ctx.state["expired"] = expired


def _expire_route(ctx: OpContext) -> None:
    """The expired roles leave the routers, and their clients there end."""
    ends = [(ctx.tenant_id, list(ctx.state.get("expired", [])))]
    ctx.state["routers"] = routing.publish(ctx.platform, end_clients_of=ends).reloaded


EXPIRE = register(
    OperationKind(
        name="expire_credentials",
        description="end the overlap window of a password rotation",
        steps=(Step("expire", _expire), Step("route", _expire_route)),
    )
)
