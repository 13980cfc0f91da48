"""The operation types and their steps.

Every step looks before it acts (CREATE only what is missing, DROP IF
EXISTS, ALTER to the wanted state), so running it again after a crash is
harmless. Secrets a step needs are stored encrypted on the tenant row before
any server sees them, so a resumed step uses the same ones.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pgfleet.crypto import generate_password
from pgfleet.errors import NoCapacity
from pgfleet.fleet.registry import ServerRecord
from pgfleet.operations.failpoints import failpoint
from pgfleet.operations.runner import OpContext, OperationKind, Step, register
from pgfleet.platform.core import Platform
from pgfleet.regions import Placement, PlacementPolicy, choose_server, get_plan
from pgfleet.tenants.naming import (
    alt_role_name,
    login_role_names,
    main_role_name,
    ro_role_name,
    rw_role_name,
    tenant_db_name,
)
from pgfleet.tenants.provisioning import (
    activate,
    converge_target_on_server,
    drop_on_server,
    ensure_alternate,
    prepare_provision,
    role_exists,
    scram_verifier,
)

# ---------------------------------------------------------------- helpers


def _tenant(p: Platform, tid: uuid.UUID) -> dict[str, Any]:
    with p.db.connection() as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute(
            "SELECT id, status, region, plan_type, server_id, hosted_region, connection_info "
            "FROM tenants WHERE id = %s",
            (tid,),
        ).fetchone()
    assert row is not None, f"tenant {tid} vanished"
    return row


def _server(p: Platform, row: dict[str, Any]) -> ServerRecord | None:
    return None if row["server_id"] is None else p.servers.get(row["server_id"])


def _set_status(p: Platform, tid: uuid.UUID, status: str, extra: str = "") -> None:
    with p.db.connection() as conn:
        conn.execute(
            sql.SQL("UPDATE tenants SET status = %s, updated_at = now(){} WHERE id = %s").format(
                sql.SQL(extra)
            ),
            (status, tid),
        )
    p.client.forget(tid)


def _login_roles(tid: uuid.UUID) -> list[str]:
    return login_role_names(tenant_db_name(tid))


def _alter_login_roles(p: Platform, tid: uuid.UUID, clause: sql.Composable) -> None:
    row = _tenant(p, tid)
    server = _server(p, row)
    if server is None:
        return
    with p.servers.admin_connection(server) as conn, conn.transaction():
        for role in _login_roles(tid):
            if role_exists(conn, role):
                conn.execute(sql.SQL("ALTER ROLE {} {}").format(sql.Identifier(role), clause))


def _end_sessions(p: Platform, tid: uuid.UUID, roles: list[str]) -> int:
    row = _tenant(p, tid)
    server = _server(p, row)
    if server is None:
        return 0
    with p.servers.admin_connection(server) as conn:
        ended = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE usename = ANY(%s) AND pid <> pg_backend_pid()",
            (roles,),
        ).fetchone()
    return int(ended[0]) if ended else 0


# ---------------------------------------------------------------- provision


def _provision_place(ctx: OpContext) -> None:
    t = prepare_provision(ctx.platform, ctx.tenant_id)
    ctx.state.update(server=t.server.name, hosted_region=t.server.region, actions=[])


def _provision_part(part: str) -> Any:
    def run(ctx: OpContext) -> None:
        t = prepare_provision(ctx.platform, ctx.tenant_id)
        ctx.state.setdefault("actions", []).extend(converge_target_on_server(ctx.platform, t, part))

    return run


def _provision_activate(ctx: OpContext) -> None:
    p = ctx.platform
    t = prepare_provision(p, ctx.tenant_id)
    activate(p, t, tuple(ctx.state.get("actions", ())))
    p.metrics.provisions.labels(t.server.region, "ok").inc()
    # From the request (the operation's creation) to credentials that work.
    took = datetime.now(UTC) - ctx.op["created_at"]
    p.metrics.provision_duration.labels(t.server.region).observe(took.total_seconds())


def _provision_undo(ctx: OpContext, reason: str = "cancelled") -> None:
    """Drop whatever the steps made; the tenant row keeps the story. If the
    server cannot be reached to clean up, the project stays `failed` for the
    reconciler."""
    p = ctx.platform
    row = _tenant(p, ctx.tenant_id)
    server = _server(p, row)
    try:
        if server is not None:
            with p.servers.admin_connection(server) as conn:
                drop_on_server(conn, name=tenant_db_name(ctx.tenant_id))
    except Exception:
        with p.db.connection() as conn:
            conn.execute(
                "UPDATE tenants SET status = 'failed', error = %s, updated_at = now() "
                "WHERE id = %s",
                (reason[:500], ctx.tenant_id),
            )
        raise
    with p.db.connection() as conn:
        conn.execute(
            "UPDATE tenants SET status = 'deleted', error = %s, connection_info = NULL, "
            "deleted_at = now(), updated_at = now() WHERE id = %s",
            (reason[:500], ctx.tenant_id),
        )
    hosted = server.region if server is not None else row["hosted_region"] or ""
    p.metrics.provisions.labels(hosted, "failed").inc()


PROVISION = register(
    OperationKind(
        name="provision",
        description="create the project's roles and database on its regional server",
        steps=(
            Step("place", _provision_place),
            Step("roles", _provision_part("roles")),
            Step("database", _provision_part("database")),
            Step("privileges", _provision_part("privileges")),
            # Once credentials are handed out the database is never undone.
            Step("activate", _provision_activate, final=True),
        ),
        on_failure=lambda ctx, reason: _provision_undo(ctx, f"provisioning failed: {reason}"),
        on_cancel=lambda ctx: _provision_undo(ctx, "provisioning was cancelled"),
    )
)

# ---------------------------------------------------------------- delete


def _delete_block(ctx: OpContext) -> None:
    _set_status(ctx.platform, ctx.tenant_id, "deleting")


def _delete_database(ctx: OpContext) -> None:
    p = ctx.platform
    server = _server(p, _tenant(p, ctx.tenant_id))
    if server is None:
        return
    name = tenant_db_name(ctx.tenant_id)
    with p.servers.admin_connection(server) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            ctx.state.setdefault("actions", []).append("drop database")


def _delete_roles(ctx: OpContext) -> None:
    p = ctx.platform
    server = _server(p, _tenant(p, ctx.tenant_id))
    if server is None:
        return
    name = tenant_db_name(ctx.tenant_id)
    with p.servers.admin_connection(server) as conn:
        for i, role in enumerate((*login_role_names(name), name)):
            if role_exists(conn, role):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
                ctx.state.setdefault("actions", []).append(f"drop role {role}")
            if i == 0:
                failpoint("delete.drop_roles.mid")


def _delete_finish(ctx: OpContext) -> None:
    _set_status(
        ctx.platform,
        ctx.tenant_id,
        "deleted",
        ", deleted_at = coalesce(deleted_at, now()), connection_info = NULL, paused_at = NULL",
    )


def _delete_restore(ctx: OpContext, reason: str | None = None) -> None:
    # Recorded with the operation when it was asked for: durable from the start.
    previous = ctx.params.get("previous_status")
    if previous:
        _set_status(ctx.platform, ctx.tenant_id, previous)


def _reached(ctx: OpContext, position: int) -> bool:
    """Has step `position` of this operation started, in any attempt? (The
    state in `ctx` only has what finished steps recorded; a crash mid-step
    leaves no trace there.)"""
    with ctx.platform.db.connection() as conn:
        row = conn.execute(
            "SELECT 1 FROM operation_steps WHERE operation_id = %s AND position >= %s LIMIT 1",
            (ctx.op["id"], position),
        ).fetchone()
    return row is not None


def _delete_failed(ctx: OpContext, reason: str) -> None:
    # Once the drop has started (now or before a crash) the database may be
    # gone: the project cannot go back to what it was.
    if _reached(ctx, 1):
        with ctx.platform.db.connection() as conn:
            conn.execute(
                "UPDATE tenants SET status = 'failed', error = %s, updated_at = now() "
                "WHERE id = %s",
                (f"delete failed: {reason}"[:500], ctx.tenant_id),
            )
    else:
        _delete_restore(ctx)


DELETE = register(
    OperationKind(
        name="delete",
        description="drop the project's database and roles; the row stays for the audit",
        steps=(
            Step("block", _delete_block),
            Step("drop_database", _delete_database, final=True),
            Step("drop_roles", _delete_roles),
            Step("finish", _delete_finish),
        ),
        on_failure=_delete_failed,
        on_cancel=_delete_restore,
    )
)

# ---------------------------------------------------------------- rotate password

_PENDING = {"rw": "pending_password_enc", "ro": "pending_ro_password_enc"}
_PENDING_USER = {"rw": "pending_user", "ro": "pending_ro_user"}
_CURRENT = {"rw": "password_enc", "ro": "ro_password_enc"}
_USER = {"rw": "user", "ro": "ro_user"}


def _roles_param(ctx: OpContext) -> list[str]:
    which = ctx.params.get("role", "all")
    return ["rw", "ro"] if which == "all" else [which]


def _update_info(p: Platform, tid: uuid.UUID, info: dict[str, Any]) -> None:
    with p.db.connection() as conn:
        conn.execute(
            "UPDATE tenants SET connection_info = %s, updated_at = now() WHERE id = %s",
            (Jsonb(info), tid),
        )


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
    info = dict(_tenant(p, ctx.tenant_id)["connection_info"] or {})
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
    row = _tenant(p, ctx.tenant_id)
    server = _server(p, row)
    assert server is not None
    info = row["connection_info"] or {}
    plan = get_plan(row["plan_type"] or "free")
    with p.servers.admin_connection(server) as conn, conn.transaction():
        # Every pending password, including one a failed rotation left
        # behind: `store` then stores them all, so what is stored is always
        # what the server has.
        for mode in ("rw", "ro"):
            pending = info.get(_PENDING[mode])
            if not pending:
                continue  # already stored by a previous run of `store`
            user = str(info[_PENDING_USER[mode]])
            password = p.secrets.decrypt(pending)
            if user.endswith("_alt"):
                ensure_alternate(
                    conn,
                    main_role_name(user),
                    password,
                    connection_limit=plan.connection_limit,
                    statement_timeout_ms=plan.statement_timeout_ms,
                    login=row["status"] != "paused",
                    actions=[],
                )
            else:
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(user), sql.Literal(scram_verifier(conn, user, password))
                    )
                )


def _rotate_store(ctx: OpContext) -> None:
    p = ctx.platform
    info = dict(_tenant(p, ctx.tenant_id)["connection_info"] or {})
    expire = list(ctx.state.get("expire", []))
    for mode in ("rw", "ro"):
        if info.get(_PENDING[mode]):
            old_user = _current_user(info, mode, ctx.tenant_id)
            new_user = str(info.pop(_PENDING_USER[mode]))
            info[_CURRENT[mode]] = info.pop(_PENDING[mode])
            info[_USER[mode]] = new_user
            if old_user != new_user and old_user not in expire:
                expire.append(old_user)
    # Kept with the credentials, in the same write, so a crash before the
    # expiry is scheduled cannot forget it.
    if expire:
        info["expire_after_overlap"] = sorted(
            set(info.get("expire_after_overlap", [])) | set(expire)
        )
    _update_info(p, ctx.tenant_id, info)
    p.client.forget(ctx.tenant_id)
    ctx.state["rotated"] = _roles_param(ctx)
    ctx.state["expire"] = expire


def _rotate_schedule_expiry(ctx: OpContext) -> None:
    """With an overlap window, the old credentials stop working when it ends:
    a job then starts an `expire_credentials` operation."""
    p = ctx.platform
    info = dict(_tenant(p, ctx.tenant_id)["connection_info"] or {})
    roles = list(info.get("expire_after_overlap", []))
    if not roles:
        return
    from pgfleet.operations.queue import schedule_expiry

    overlap = int(ctx.params.get("overlap_s") or 0)
    at = schedule_expiry(p, ctx.tenant_id, roles, overlap, key=str(ctx.op["id"]))
    info.pop("expire_after_overlap", None)
    _update_info(p, ctx.tenant_id, info)
    ctx.state["expire"] = roles
    ctx.state["old_credentials_expire_at"] = at


def _rotate_failed(ctx: OpContext, reason: str) -> None:
    """Before `apply` the new passwords are dropped. After it, the server may
    already have them: they stay pending, and the next rotation applies and
    stores them (its `generate` keeps pending passwords)."""
    if not _reached(ctx, 1):
        _rotate_discard(ctx)


def _rotate_discard(ctx: OpContext, reason: str | None = None) -> None:
    p = ctx.platform
    info = dict(_tenant(p, ctx.tenant_id)["connection_info"] or {})
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
    row = _tenant(p, ctx.tenant_id)
    server = _server(p, row)
    if server is None:
        return
    info = row["connection_info"] or {}
    in_use = {_current_user(info, m, ctx.tenant_id) for m in ("rw", "ro")}
    expired = []
    with p.servers.admin_connection(server) as conn, conn.transaction():
        for role in ctx.params.get("roles", []):
            if role in in_use or role not in _login_roles(ctx.tenant_id):
                continue
            if role_exists(conn, role):
                clause = "NOLOGIN PASSWORD NULL" if role.endswith("_alt") else "PASSWORD NULL"
                conn.execute(
                    sql.SQL("ALTER ROLE {} {}").format(sql.Identifier(role), sql.SQL(clause))
                )
                expired.append(role)
    ctx.state["expired"] = expired


EXPIRE = register(
    OperationKind(
        name="expire_credentials",
        description="end the overlap window of a password rotation",
        steps=(Step("expire", _expire),),
    )
)

# ---------------------------------------------------------------- pause / resume


def _pause_mark(ctx: OpContext) -> None:
    _set_status(ctx.platform, ctx.tenant_id, "paused", ", paused_at = coalesce(paused_at, now())")


def _pause_block(ctx: OpContext) -> None:
    _alter_login_roles(ctx.platform, ctx.tenant_id, sql.SQL("NOLOGIN"))


def _pause_end_sessions(ctx: OpContext) -> None:
    ctx.state["sessions_ended"] = ctx.state.get("sessions_ended", 0) + _end_sessions(
        ctx.platform, ctx.tenant_id, _login_roles(ctx.tenant_id)
    )


def _pause_undo(ctx: OpContext, reason: str | None = None) -> None:
    _alter_login_roles(ctx.platform, ctx.tenant_id, sql.SQL("LOGIN"))
    _set_status(ctx.platform, ctx.tenant_id, "active", ", paused_at = NULL")


PAUSE = register(
    OperationKind(
        name="pause",
        description="refuse new connections and end the open ones; data stays",
        steps=(
            Step("mark", _pause_mark),
            Step("block_logins", _pause_block),
            Step("end_sessions", _pause_end_sessions),
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
    _set_status(ctx.platform, ctx.tenant_id, "active", ", paused_at = NULL")


def _resume_undo(ctx: OpContext, reason: str | None = None) -> None:
    _alter_login_roles(ctx.platform, ctx.tenant_id, sql.SQL("NOLOGIN"))


RESUME = register(
    OperationKind(
        name="resume",
        description="accept connections again",
        steps=(
            Step("allow_logins", _resume_allow),
            Step("privileges", _resume_privileges),
            Step("mark", _resume_mark),
        ),
        on_failure=_resume_undo,
        on_cancel=_resume_undo,
    )
)

# ---------------------------------------------------------------- change plan


def _plan_limits(ctx: OpContext) -> None:
    plan = get_plan(ctx.params["plan"])
    p = ctx.platform
    row = _tenant(p, ctx.tenant_id)
    server = _server(p, row)
    if server is None:
        return
    timeout = f"{plan.statement_timeout_ms}ms"
    with p.servers.admin_connection(server) as conn, conn.transaction():
        for role in _login_roles(ctx.tenant_id):
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
    row = _tenant(p, ctx.tenant_id)
    current = row["hosted_region"]
    try:
        wanted_region = choose_server(
            policy=PlacementPolicy(p.settings.placement),
            region=row["region"] or p.settings.default_region,
            plan=plan.id,
            servers=p.servers.loads(),
            default_region=p.settings.default_region,
        )
    except NoCapacity as e:  # advice only: a full fleet does not stop a plan change
        wanted_region = Placement(0, "", current, f"no placement possible now: {e.message}")
    with p.db.connection() as conn:
        conn.execute(
            "UPDATE tenants SET plan_type = %s, updated_at = now() WHERE id = %s",
            (plan.id, ctx.tenant_id),
        )
    p.client.forget(ctx.tenant_id)
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
        undo = OpContext(ctx.platform, {**ctx.op, "params": {"plan": previous}})
        _plan_limits(undo)


CHANGE_PLAN = register(
    OperationKind(
        name="change_plan",
        description="apply a plan's limits (connections, statement timeout) and record it",
        steps=(Step("limits", _plan_limits), Step("record", _plan_record)),
        on_failure=_plan_undo,
        on_cancel=_plan_undo,
    )
)
