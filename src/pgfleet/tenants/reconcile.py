"""The reconciler: compare the platform DB with every regional server.

It reports, and with `repair=True` fixes:
- `orphan_database`: a tenant database with no live project (no row, the
  row deleted, or the project placed on another server) and no prepared
  spare of its server (tenants/spares.py) — dropped, unless it
  holds data (any table, view, sequence...), which needs `force=True`;
- `orphan_roles`: a project's roles with no database and no live project —
  dropped;
- `missing_database`, `missing_role`, `wrong_owner`, `public_connect`,
  `wrong_login`: an active or paused project whose database, roles, owner,
  grants or login state are not what they should be — converged again
  (the same code the provision operation runs);
- `role_attributes`, `role_limits`, `role_settings`, `role_membership`: a
  project's role with an attribute no tenant role may have (SUPERUSER,
  CREATEROLE, CREATEDB, REPLICATION, BYPASSRLS, NOINHERIT), another
  connection limit than its plan's, per-role settings other than pgfleet's
  (a tenant's `ALTER ROLE current_user SET statement_timeout = 0` among
  them), or memberships other than its project's own — converged again;
- `password_changed`: a login role whose password is not the one pgfleet
  holds (a tenant may change its own) — converged again, which sets it back;
- `stuck_provisioning`: a project `provisioning` with no operation running —
  converged and activated; but one whose create failed or was cancelled
  (its undo could not finish: the platform DB lost mid-way, say) is marked
  `failed` instead: its caller was told it failed and never got its
  credentials, so it is not brought to life behind their back;
- `failed_project`: a project left `failed` (reported; deleting it cleans up);
- `stale_credential`: a login role of a live project that still has a
  password although no credential uses it and no expiry is pending (an
  overlap window whose expiry failed, say with its region down) — expired
  by an `expire_credentials` operation. Needs a superuser admin (it reads
  pg_authid); with a lesser admin the check is skipped.

Projects with an operation in flight are left alone: their worker owns them.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgfleet.crypto import verifier_matches
from pgfleet.errors import PgfleetError, RegionUnavailable
from pgfleet.fleet.registry import PROBE_ROLE, ServerRecord
from pgfleet.operations.registry import REGISTRY, OpContext, OperationKind, Step, register
from pgfleet.platform.core import Platform
from pgfleet.regions import get_plan
from pgfleet.tenants import routing, store
from pgfleet.tenants.kinds.credentials import EXPIRE_TASK, credential_users, schedule_expiry
from pgfleet.tenants.naming import (
    ROLE_RE,
    login_role_names,
    ro_role_name,
    rw_role_name,
    tenant_db_name,
    tenant_id_of,
)
from pgfleet.tenants.provisioning import ensure_tenant_database_provisioned
from pgfleet.tenants.roles import (
    RoleState,
    existing_alternates,
    read_role_states,
    role_findings,
    wanted_roles,
)
from pgfleet.tenants.server import drop_database, drop_role, scram_verifier

log = logging.getLogger(__name__)

LIVE = store.LIVE


def _role_passwords(conn: psycopg.Connection[Any]) -> dict[str, str] | None:
    """Tenant roles that have a password, with their SCRAM verifiers; None if
    this admin may not read pg_authid (not a superuser)."""
    try:
        with conn.transaction():
            return {
                r[0]: r[1]
                for r in conn.execute(
                    "SELECT rolname, rolpassword FROM pg_catalog.pg_authid "
                    "WHERE rolname LIKE 'tenant\\_%%' AND rolpassword IS NOT NULL"
                )
            }
    except psycopg.errors.InsufficientPrivilege:
        return None


def _relations(p: Platform, server: ServerRecord, db: str) -> int | None:
    """How many relations a database without a live project holds, counted
    by the probe role (no privilege at all), never by the admin: a tenant's
    objects may still be in there. None if it cannot be looked into."""
    if not server.probe_password:
        return None
    ident, probe = sql.Identifier(db), sql.Identifier(PROBE_ROLE)
    with p.servers.admin_connection(server) as aconn:
        verifier = scram_verifier(aconn, PROBE_ROLE, server.probe_password)
        attrs = sql.SQL(
            "LOGIN NOSUPERUSER NOINHERIT NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
            "CONNECTION LIMIT 4 PASSWORD {}"
        ).format(sql.Literal(verifier))
        if aconn.execute(
            "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (PROBE_ROLE,)
        ).fetchone():
            aconn.execute(sql.SQL("ALTER ROLE {} {}").format(probe, attrs))
        else:
            aconn.execute(sql.SQL("CREATE ROLE {} {}").format(probe, attrs))
        aconn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(ident, probe))
    try:
        with p.servers.probe_session(server, db) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_catalog.pg_class c "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
                "AND n.nspname NOT LIKE 'pg\\_temp%%' "
                "AND n.nspname NOT LIKE 'pg\\_toast\\_temp%%' "
                "AND c.relkind IN ('r', 'p', 'm', 'S', 'v', 'f')"
            ).fetchone()
        return int(row[0]) if row else 0
    except (PgfleetError, psycopg.Error) as e:
        log.warning("reconciler: cannot look into database %s on %s: %s", db, server.name, e)
        return None
    finally:
        with p.servers.admin_connection(server) as aconn:
            aconn.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM {}").format(ident, probe))


def _password_findings(
    p: Platform, info: dict[str, Any], tid: uuid.UUID, passwords: dict[str, str]
) -> list[tuple[str, str]]:
    """A login role in use whose password is not the one pgfleet holds."""
    out = []
    name = tenant_db_name(tid)
    for user_key, enc_key, default in (
        ("user", "password_enc", rw_role_name(name)),
        ("ro_user", "ro_password_enc", ro_role_name(name)),
    ):
        if not info.get(enc_key):
            continue
        user = str(info.get(user_key) or default)
        verifier = passwords.get(user)
        if verifier is None or not verifier_matches(verifier, p.secrets.decrypt(info[enc_key])):
            out.append(
                (
                    "password_changed",
                    f"role {user}'s password is not the one pgfleet holds "
                    "(changed from inside the project?)",
                )
            )
    return out


def reconcile(
    platform: Platform,
    *,
    repair: bool = False,
    force: bool = False,
    record: bool = True,
    actor: str = "reconciler",
) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = platform
    findings: list[dict[str, Any]] = []

    def add(
        kind: str, server: ServerRecord | None, obj: str, detail: str, **kw: Any
    ) -> dict[str, Any]:
        f = {
            "kind": kind,
            "server": server.name if server else None,
            "region": server.region if server else None,
            "object": obj,
            "detail": detail,
            "repaired": False,
            "action": None,
            **kw,
        }
        findings.append(f)
        return f

    converge: dict[uuid.UUID, dict[str, Any]] = {}
    # Projects whose create was given up but never undone: marked failed.
    given_up: dict[uuid.UUID, dict[str, Any]] = {}
    unreachable: list[str] = []
    # The servers first, the platform DB after: a project's row is committed
    # before anything of it exists on a server, so whatever the listing shows
    # already has its row when the tenants are read (no new project looks
    # like an orphan).
    listings: list[
        tuple[ServerRecord, dict[str, Any], dict[str, RoleState], dict[str, str] | None]
    ] = []
    for server in p.servers.all(enabled_only=True):
        try:
            with p.servers.admin_connection(server) as aconn:
                dbs = {
                    r[0]: r[1:]
                    for r in aconn.execute(
                        "SELECT datname, pg_get_userbyid(datdba), "
                        "coalesce(datacl::text[], '{}'), datistemplate, datallowconn, "
                        "datconnlimit FROM pg_database WHERE datname LIKE 'tenant\\_%%'"
                    )
                }
                states = read_role_states(aconn)
                passwords = _role_passwords(aconn)
            listings.append((server, dbs, states, passwords))
        except RegionUnavailable as e:
            unreachable.append(server.name)
            add("server_unreachable", server, server.name, e.message)
    with p.db.connection() as conn, conn.transaction():
        # One snapshot for both: a create takes a spare (its row gone, the
        # project's row there) in one transaction, so its database is always
        # one or the other's here, never an orphan.
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        tenants = {r["id"]: r for r in store.all_for_reconcile(conn, EXPIRE_TASK)}
        # Prepared spares are named like the projects they will be; those a
        # create gave back or a crash left are the refill's to drop
        # (tenants/spares.py).
        spare_of = dict(conn.execute("SELECT id, server_id FROM spares").fetchall())
    expire: dict[uuid.UUID, list[str]] = {}
    for server, dbs, states, passwords in listings:

        def live_here(tid: uuid.UUID | None, server: ServerRecord = server) -> bool:
            if tid is not None and spare_of.get(tid) == server.id:
                return True  # a prepared spare of this server
            t = tenants.get(tid) if tid else None
            return t is not None and t["status"] in LIVE and t["server_id"] == server.id

        # Databases with no live project.
        for db in sorted(dbs):
            tid = tenant_id_of(db)
            if tid is None or live_here(tid):
                continue
            relations = _relations(p, server, db)
            why = "no project" if tid not in tenants else f"project is {tenants[tid]['status']}"
            if tenants.get(tid) and tenants[tid]["status"] in LIVE:
                why = "project is placed on another server"
            holds = (
                "could not be looked into"
                if relations is None
                else f"holds {relations} relation(s)"
            )
            f = add(
                "orphan_database",
                server,
                db,
                f"{why}; {holds}",
                tenant_id=str(tid) if tid else None,
                relations=relations,
            )
            if repair:
                if relations is None and not force:
                    f["action"] = "kept: it could not be looked into; repair with force to drop it"
                elif relations and not force:
                    f["action"] = "kept: it holds data; repair with force to drop it"
                else:
                    with p.servers.admin_connection(server) as aconn:
                        drop_database(aconn, db)
                    f.update(repaired=True, action="dropped")
        # Roles with no database and no live project.
        dropped = {
            f["object"] for f in findings if f["kind"] == "orphan_database" and f["repaired"]
        }
        groups: dict[str, list[str]] = {}
        for role in states:
            m = ROLE_RE.match(role)
            if m:
                groups.setdefault(m.group(1), []).append(role)
        for base, members in sorted(groups.items()):
            tid = tenant_id_of(base)
            if live_here(tid) or (base in dbs and base not in dropped):
                continue
            f = add(
                "orphan_roles",
                server,
                base,
                f"roles {', '.join(sorted(members))} belong to no live project",
                tenant_id=str(tid) if tid else None,
            )
            if repair:
                try:
                    with p.servers.admin_connection(server, evict=members) as aconn:
                        for role in sorted(members, key=len, reverse=True):
                            drop_role(aconn, role)
                    f.update(repaired=True, action="dropped")
                except psycopg.Error as e:
                    f["action"] = f"not dropped: {str(e).strip().splitlines()[0]}"
        # Live projects on this server.
        for tid, t in tenants.items():
            if t["server_id"] != server.id or t["busy"] or t["status"] not in ("active", "paused"):
                continue
            name = tenant_db_name(tid)
            problems: list[tuple[str, str]] = []
            if name not in dbs:
                problems.append(
                    ("missing_database", f"project is {t['status']} but has no database")
                )
            else:
                owner, acl, template, allow_conn, conn_limit = dbs[name]
                if owner != rw_role_name(name):
                    problems.append(("wrong_owner", f"database owned by {owner}"))
                if template or not allow_conn or conn_limit != -1:
                    problems.append(
                        (
                            "database_attributes",
                            f"database is_template={template}, allow_connections={allow_conn}, "
                            f"connection_limit={conn_limit} (want false, true, -1)",
                        )
                    )
                if any(a.startswith("=") and "c" in a.split("/")[0] for a in acl):
                    problems.append(("public_connect", "PUBLIC may connect to the database"))
            want_login = t["status"] == "active"
            for role in (name, rw_role_name(name), ro_role_name(name)):
                if role not in states:
                    problems.append(("missing_role", f"role {role} is missing"))
                elif role != name and states[role].can_login != want_login:
                    problems.append(
                        (
                            "wrong_login",
                            f"role {role} {'can' if states[role].can_login else 'cannot'} "
                            f"log in but the project is {t['status']}",
                        )
                    )
            plan = get_plan(t["plan_type"] or "free")
            info = t["connection_info"] or {}
            wanted = wanted_roles(
                name,
                login=want_login,
                connection_limit=plan.connection_limit,
                statement_timeout_ms=plan.statement_timeout_ms,
                alternates=existing_alternates(name, states),
            )
            trusted = frozenset({server.admin_user})
            for kind, _role, detail in role_findings(wanted, states, trusted=trusted):
                problems.append((kind, detail))
            if passwords is not None:
                problems += _password_findings(p, info, tid, passwords)
            for kind, detail in problems:
                converge[tid] = add(kind, server, name, detail, tenant_id=str(tid))
            if passwords is not None and not t["expiry_pending"]:
                in_use = credential_users(info, tid)
                for role in login_role_names(name):
                    if role in passwords and role not in in_use:
                        expire.setdefault(tid, []).append(role)
                        add(
                            "stale_credential",
                            server,
                            role,
                            "the role still has a password but no credential uses it",
                            tenant_id=str(tid),
                        )
    # Platform-side states.
    for tid, t in tenants.items():
        if t["busy"]:
            continue
        if t["status"] == "provisioning" and t["made_by"] in ("failed", "cancelled"):
            given_up[tid] = add(
                "stuck_provisioning",
                None,
                tenant_db_name(tid),
                f"project is provisioning but the operation that made it was {t['made_by']} "
                "(its undo did not finish)",
                tenant_id=str(tid),
            )
        elif t["status"] == "provisioning":
            converge[tid] = add(
                "stuck_provisioning",
                None,
                tenant_db_name(tid),
                "project is provisioning but no operation is running",
                tenant_id=str(tid),
            )
        elif t["status"] == "failed":
            add(
                "failed_project",
                None,
                tenant_db_name(tid),
                "project is failed; deleting it removes what is left",
                tenant_id=str(tid),
            )
    if repair:
        for tid, f in given_up.items():
            try:
                with p.db.connection() as conn:
                    marked = store.fail_given_up(
                        conn, tid, "its create ended before what it made was undone"
                    )
            except Exception as e:
                f["action"] = f"could not mark it failed: {e}"
                continue
            if marked:
                f.update(repaired=True, action="marked failed: deleting it removes what is left")
            else:
                f["action"] = "left alone: an operation started on it since"
        for tid, f in converge.items():
            try:
                ensure_tenant_database_provisioned(
                    tid, tenants[tid]["region"], platform=p, publish_routes=False
                )
                for x in findings:
                    if x.get("tenant_id") == str(tid) and x["kind"] != "failed_project":
                        x.update(repaired=True, action="converged")
            except Exception as e:
                f["action"] = f"converge failed: {e}"
    if repair and converge:
        # Passwords set again have new salts: the routers must hold them.
        routing.publish(p, projects=converge)
    router_drift = routing.drift(p)
    for name, (missing, extra) in router_drift.items():
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} active project(s) or spare(s) missing (e.g. {sorted(missing)[0]})"
            )
        if extra:
            parts.append(f"{len(extra)} database(s) that are neither active projects nor spares")
        f = add("router_drift", None, f"router {name}", "; ".join(parts) or "not reachable")
        f["region"] = name.rsplit("-", 1)[0]
    if repair and router_drift:
        done = routing.publish(p)
        for x in findings:
            if x["kind"] == "router_drift" and x["object"].removeprefix("router ") in done.reloaded:
                x.update(repaired=True, action="route table rewritten and reloaded")
    if repair and expire:
        for tid, stale in expire.items():
            schedule_expiry(p, tid, stale, 0, key=f"reconcile:{tid}:{uuid.uuid4()}")
            for x in findings:
                if x["kind"] == "stale_credential" and x.get("tenant_id") == str(tid):
                    x["action"] = "expire_credentials queued"
    report = {
        "repair": repair,
        "force": force,
        "servers_checked": len(p.servers.all(enabled_only=True)) - len(unreachable),
        "servers_unreachable": unreachable,
        "findings": findings,
        "duration_ms": round((time.perf_counter() - t0) * 1000, 1),
    }
    if record:
        with p.db.connection() as conn:
            conn.execute(
                "INSERT INTO reconcile_runs (actor, repair, force, duration_ms, findings) "
                "VALUES (%s, %s, %s, %s, %s)",
                (actor, repair, force, report["duration_ms"], Jsonb(findings)),
            )
    if findings:
        log.info("reconciler: %d finding(s)", len(findings))
    return report


def last_run(platform: Platform) -> dict[str, Any] | None:
    with platform.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT id, at, actor, repair, force, duration_ms, findings FROM reconcile_runs "
            "ORDER BY id DESC LIMIT 1"
        ).fetchone()


@REGISTRY.every("reconcile_report", lambda s: s.reconcile_interval_s, at_start=False)
def periodic_report(platform: Platform) -> None:
    """The workers' periodic run: report only (repairs are asked for)."""
    reconcile(platform, repair=False, record=True)


def _reconcile_step(ctx: OpContext) -> None:
    """Compare and repair, all of it (repairs converge, so running it again
    after a crash is harmless); the report is the operation's result."""
    report = reconcile(
        ctx.platform,
        repair=True,
        force=bool(ctx.params.get("force")),
        record=True,
        actor=ctx.op.actor or "reconciler",
    )
    ctx.state["report"] = report
    repaired = sum(1 for f in report["findings"] if f["repaired"])
    ctx.state["summary"] = f"{len(report['findings'])} finding(s), {repaired} repaired"


RECONCILE = register(
    OperationKind(
        name="reconcile",
        description="compare the platform DB with every server and repair what differs",
        steps=(Step("repair", _reconcile_step),),
    )
)
