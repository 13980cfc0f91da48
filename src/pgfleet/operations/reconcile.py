"""The reconciler: compare the platform DB with every regional server.

It reports, and with `repair=True` fixes:
- `orphan_database`: a tenant database with no live project (no row, the
  row deleted, or the project placed on another server) — dropped, unless it
  holds data (any table, view, sequence...), which needs `force=True`;
- `orphan_roles`: a project's roles with no database and no live project —
  dropped;
- `missing_database`, `missing_role`, `wrong_owner`, `public_connect`,
  `wrong_login`: an active or paused project whose database, roles, owner,
  grants or login state are not what they should be — converged again
  (the same code the provision operation runs);
- `stuck_provisioning`: a project `provisioning` with no operation running —
  converged and activated;
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
import re
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgfleet.errors import RegionUnavailable
from pgfleet.fleet.registry import ServerRecord
from pgfleet.operations.kinds import credential_users
from pgfleet.operations.queue import EXPIRE_TASK, schedule_expiry
from pgfleet.platform.core import Platform
from pgfleet.tenants.provisioning import (
    ensure_tenant_database_provisioned,
    login_role_names,
    ro_role_name,
    rw_role_name,
    tenant_db_name,
)

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^tenant_([0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12})$")
_ROLE_RE = re.compile(
    r"^(tenant_[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12})(_rw|_ro)?(_alt)?$"
)
LIVE = ("active", "paused", "provisioning", "failed", "deleting")


def _tid(name: str) -> uuid.UUID | None:
    m = _NAME_RE.match(name)
    return uuid.UUID(m.group(1).replace("_", "-")) if m else None


def _roles_with_passwords(conn: psycopg.Connection[Any]) -> set[str] | None:
    """Tenant roles that have a password; None if this admin may not read
    pg_authid (not a superuser)."""
    try:
        with conn.transaction():
            return {
                r[0]
                for r in conn.execute(
                    "SELECT rolname FROM pg_authid "
                    "WHERE rolname LIKE 'tenant\\_%%' AND rolpassword IS NOT NULL"
                )
            }
    except psycopg.errors.InsufficientPrivilege:
        return None


def _relations(p: Platform, server: ServerRecord, db: str) -> int:
    with p.servers.direct_admin_connection(server, db) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
            "AND n.nspname NOT LIKE 'pg\\_temp%%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp%%' "
            "AND c.relkind IN ('r', 'p', 'm', 'S', 'v', 'f')"
        ).fetchone()
    return int(row[0]) if row else 0


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
    unreachable: list[str] = []
    # The servers first, the platform DB after: a project's row is committed
    # before anything of it exists on a server, so whatever the listing shows
    # already has its row when the tenants are read (no new project looks
    # like an orphan).
    listings: list[tuple[ServerRecord, dict[str, Any], dict[str, bool], set[str] | None]] = []
    for server in p.servers.all(enabled_only=True):
        try:
            with p.servers.admin_connection(server) as aconn:
                dbs = {
                    r[0]: r[1:]
                    for r in aconn.execute(
                        "SELECT datname, pg_get_userbyid(datdba), "
                        "coalesce(datacl::text[], '{}') FROM pg_database "
                        "WHERE datname LIKE 'tenant\\_%%'"
                    )
                }
                roles = {
                    r[0]: bool(r[1])
                    for r in aconn.execute(
                        "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE 'tenant\\_%%'"
                    )
                }
                passwords = _roles_with_passwords(aconn)
            listings.append((server, dbs, roles, passwords))
        except RegionUnavailable as e:
            unreachable.append(server.name)
            add("server_unreachable", server, server.name, e.message)
    with p.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        tenants = {
            r["id"]: r
            for r in cur.execute(
                "SELECT t.id, t.status, t.server_id, t.region, t.connection_info, "
                "EXISTS (SELECT 1 FROM operations o WHERE o.tenant_id = t.id "
                "AND o.status IN ('scheduled', 'running')) AS busy, "
                "EXISTS (SELECT 1 FROM procrastinate_jobs j WHERE j.task_name = %s "
                "AND j.status IN ('todo', 'doing') AND j.args->>'tenant_id' = t.id::text) "
                "AS expiry_pending FROM tenants t",
                (EXPIRE_TASK,),
            )
        }
    expire: dict[uuid.UUID, list[str]] = {}
    for server, dbs, roles, passwords in listings:

        def live_here(tid: uuid.UUID | None, server: ServerRecord = server) -> bool:
            t = tenants.get(tid) if tid else None
            return t is not None and t["status"] in LIVE and t["server_id"] == server.id

        # Databases with no live project.
        for db in sorted(dbs):
            tid = _tid(db)
            if tid is None or live_here(tid):
                continue
            relations = _relations(p, server, db)
            why = "no project" if tid not in tenants else f"project is {tenants[tid]['status']}"
            if tenants.get(tid) and tenants[tid]["status"] in LIVE:
                why = "project is placed on another server"
            f = add(
                "orphan_database",
                server,
                db,
                f"{why}; holds {relations} relation(s)",
                tenant_id=str(tid) if tid else None,
                relations=relations,
            )
            if repair:
                if relations and not force:
                    f["action"] = "kept: it holds data; repair with force to drop it"
                else:
                    with p.servers.admin_connection(server) as aconn:
                        aconn.execute(
                            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                                sql.Identifier(db)
                            )
                        )
                    f.update(repaired=True, action="dropped")
        # Roles with no database and no live project.
        dropped = {
            f["object"] for f in findings if f["kind"] == "orphan_database" and f["repaired"]
        }
        groups: dict[str, list[str]] = {}
        for role in roles:
            m = _ROLE_RE.match(role)
            if m:
                groups.setdefault(m.group(1), []).append(role)
        for base, members in sorted(groups.items()):
            tid = _tid(base)
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
                    with p.servers.admin_connection(server) as aconn:
                        for role in sorted(members, key=len, reverse=True):
                            aconn.execute(
                                sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role))
                            )
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
                owner, acl = dbs[name]
                if owner != rw_role_name(name):
                    problems.append(("wrong_owner", f"database owned by {owner}"))
                if any(a.startswith("=") and "c" in a.split("/")[0] for a in acl):
                    problems.append(("public_connect", "PUBLIC may connect to the database"))
            want_login = t["status"] == "active"
            for role in (name, rw_role_name(name), ro_role_name(name)):
                if role not in roles:
                    problems.append(("missing_role", f"role {role} is missing"))
                elif role != name and roles[role] != want_login:
                    problems.append(
                        (
                            "wrong_login",
                            f"role {role} {'can' if roles[role] else 'cannot'} log in "
                            f"but the project is {t['status']}",
                        )
                    )
            for kind, detail in problems:
                converge[tid] = add(kind, server, name, detail, tenant_id=str(tid))
            if passwords is not None and not t["expiry_pending"]:
                in_use = credential_users(t["connection_info"] or {}, tid)
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
        if t["status"] == "provisioning":
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
        for tid, f in converge.items():
            try:
                ensure_tenant_database_provisioned(tid, tenants[tid]["region"], platform=p)
                for x in findings:
                    if x.get("tenant_id") == str(tid) and x["kind"] != "failed_project":
                        x.update(repaired=True, action="converged")
            except Exception as e:
                f["action"] = f"converge failed: {e}"
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
