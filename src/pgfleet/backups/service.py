"""Backups for issue-level callers (API, CLI, console): snapshots, the
restorable window, restores, and the servers' base backups (admins)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from pgfleet.backups import archives, kinds, retention
from pgfleet.backups import store as bstore
from pgfleet.backups.archives import Window
from pgfleet.display import when
from pgfleet.errors import BackupNotFound, Conflict, Forbidden, InvalidInput, PgfleetError
from pgfleet.fleet.archive import BACKUP_TYPES, BaseBackup
from pgfleet.fleet.health import check_server
from pgfleet.operations.registry import REGISTRY
from pgfleet.operations.service import start_operation
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from pgfleet.regions import get_plan, get_region, require_residency, residency_allows
from pgfleet.tenants import service as tenants
from pgfleet.tenants import store
from pgfleet.tenants.naming import tenant_db_name
from pgfleet.tenants.store import Tenant

log = logging.getLogger(__name__)
# This domain's operation kinds, registered with the engine on import.
KINDS = kinds
# Snapshots and restores copy whole databases: they get longer than the
# default deadline.
BACKUP_DEADLINE_S = 6 * 3600.0
RESTORE_INTO = ("new", "same")
# Snapshots and restores of one owner's projects running at once: each holds
# a worker slot while it copies, so one owner cannot take them all.
MAX_COPIES_PER_OWNER = 2
COPY_KINDS = ["snapshot", "restore", "restore_in_place"]


def _check_copies(conn: psycopg.Connection[Any], owner_id: uuid.UUID | None) -> None:
    if owner_id is None:
        return
    row = conn.execute(
        "SELECT count(*) FROM operations WHERE owner_id = %s AND type = ANY(%s) "
        "AND status IN ('scheduled', 'running')",
        (owner_id, COPY_KINDS),
    ).fetchone()
    if row is not None and row[0] >= MAX_COPIES_PER_OWNER:
        raise Conflict(
            f"{row[0]} snapshots or restores of your projects are running; at most "
            f"{MAX_COPIES_PER_OWNER} run at once per owner: wait for one to finish "
            "(see `pgfleet ops list`)",
            running=int(row[0]),
            limit=MAX_COPIES_PER_OWNER,
        )


def _snapshot_record(
    platform: Platform, project: Tenant, hosted: str, storage: str, reason: str
) -> tuple[uuid.UUID, Callable[[psycopg.Connection[Any]], None]]:
    """A new snapshot's id, and what records it (`running`) in the
    operation's own transaction: the project still active, its owner under
    the copies limit."""
    sid = uuid.uuid4()
    path = archives.storage_dir(platform, storage) / "snapshots" / str(project.id) / f"{sid}.dump"

    def record(conn: psycopg.Connection[Any]) -> None:
        status = store.lock_row_status(conn, project.id)
        if status != "active":
            raise Conflict(f"project {project.id} changed to {status} meanwhile", status=status)
        _check_copies(conn, project.owner_id)
        bstore.insert(
            conn,
            snapshot_id=sid,
            tenant_id=project.id,
            owner_id=project.owner_id,
            reason=reason,
            server_name=project.server,
            source_region=hosted,
            storage_region=storage,
            path=str(path),
        )

    return sid, record


def start_snapshot(
    platform: Platform, owner: Owner, project_id: str | uuid.UUID, *, reason: str = "manual"
) -> tuple[uuid.UUID, uuid.UUID]:
    """Record a snapshot (`running`) and its operation; returns (snapshot
    id, operation id)."""
    project = tenants.get_project(platform, owner, project_id)
    if project.status != "active":
        raise Conflict(
            f"project {project.id} is {project.status}; a snapshot needs it to be active",
            status=project.status,
        )
    hosted = project.hosted_region or project.region or ""
    storage = archives.storage_region(platform, hosted, project.server)
    require_residency(project.residency, storage, what="its backups' storage")
    sid, record = _snapshot_record(platform, project, hosted, storage, reason)

    op_id = start_operation(
        platform,
        owner,
        type="snapshot",
        tenant_id=project.id,
        tenant_owner=project.owner_id,
        action="project.snapshot",
        params={"snapshot_id": str(sid)},
        details={"reason": reason, "storage_region": storage},
        prepare=record,
        deadline_s=BACKUP_DEADLINE_S,
    )
    with platform.db.connection() as conn:
        bstore.set_operation(conn, sid, op_id)
    return sid, op_id


def get_snapshot(
    platform: Platform, owner: Owner, project_id: str | uuid.UUID, snapshot_id: str | uuid.UUID
) -> bstore.Snapshot:
    project = tenants.get_project(platform, owner, project_id, include_deleted=True)
    try:
        sid = uuid.UUID(str(snapshot_id))
    except ValueError:
        raise BackupNotFound(f"backup {snapshot_id} not found") from None
    with platform.db.connection() as conn:
        snap = bstore.get(conn, sid)
    if snap is None or snap.tenant_id != project.id or snap.status == "expired":
        raise BackupNotFound(f"backup {snapshot_id} not found")
    return snap


@dataclass(frozen=True)
class Backups:
    project: Tenant
    snapshots: list[bstore.Snapshot]
    window: Window | None
    window_note: str
    storage_region: str


@dataclass(frozen=True)
class Dropped:
    """Where a deleted project's data ends in its server's archive: the
    restore point its delete made just before the drop."""

    at: datetime
    restore_point: str | None
    database_oid: int | None = None


def _dropped(platform: Platform, project: Tenant) -> Dropped | None:
    if project.status not in ("deleted", "deleting"):
        return None
    with platform.db.connection() as conn:
        row = conn.execute(
            "SELECT result->>'restore_point', result->>'restore_point_at', "
            "(result->>'database_oid')::bigint FROM operations "
            "WHERE tenant_id = %s AND type = 'delete' AND result ? 'restore_point' "
            "ORDER BY created_at DESC LIMIT 1",
            (project.id,),
        ).fetchone()
    if row is not None and row[1]:
        return Dropped(datetime.fromisoformat(row[1]), row[0], row[2])
    # Deleted before deletes made restore points: up to when it was asked.
    return Dropped(project.deleted_at, None) if project.deleted_at else None


def _deleted_at(platform: Platform, project: Tenant) -> datetime | None:
    dropped = _dropped(platform, project)
    return dropped.at if dropped else None


def list_backups(platform: Platform, owner: Owner, project_id: str | uuid.UUID) -> Backups:
    project = tenants.get_project(platform, owner, project_id, include_deleted=True)
    with platform.db.connection() as conn:
        snaps = bstore.of_tenant(conn, project.id, statuses=("running", "ok", "failed"))
    window, note = archives.restorable_window(
        platform, project, deleted_at=_deleted_at(platform, project)
    )
    hosted = project.hosted_region or project.region or ""
    return Backups(
        project, snaps, window, note, archives.storage_region(platform, hosted, project.server)
    )


def _in_window(target: datetime, window: Window | None, note: str) -> None:
    if window is None:
        raise InvalidInput(
            f"this project cannot be restored to a point in time: {note}", field="target_time"
        )
    if not window.earliest <= target <= window.latest:
        raise InvalidInput(
            f"target_time {when(target)} is outside the restorable window "
            f"{when(window.earliest, round_up=True)} .. {when(window.latest)} ({note})",
            field="target_time",
            earliest=window.earliest.isoformat(),
            latest=window.latest.isoformat(),
        )


def start_restore(
    platform: Platform,
    owner: Owner,
    project_id: str | uuid.UUID,
    *,
    target_time: datetime | None = None,
    backup_id: str | None = None,
    region: str | None = None,
    into: str = "new",
    name: str | None = None,
    wait_for_region: bool = False,
) -> tuple[Tenant, uuid.UUID]:
    """Restore a project (a point in time of its archive, or one of its
    snapshots) into a new project; returns (new project, operation id).
    `wait_for_region` is the create's (tenants.service.start_create_project)
    for the new project's server; a restore over the project itself waits
    for its server in any case (its data is there)."""
    if into not in RESTORE_INTO:
        raise InvalidInput(
            f"into must be 'new' (a new project beside the original) or 'same' (over the "
            f"project itself, after a safety snapshot), not {into!r}",
            field="into",
        )
    if target_time is not None and backup_id is not None:
        raise InvalidInput("give target_time or backup_id, not both", field="target_time")
    source = tenants.get_project(platform, owner, project_id, include_deleted=True)
    if into == "same" and wait_for_region:
        raise InvalidInput(
            "wait_for_region is for into=new; a restore over the project itself always "
            "waits for the project's server, which holds its data",
            field="wait_for_region",
        )
    if source.status in ("provisioning", "failed") or source.server is None:
        raise Conflict(
            f"project {source.id} is {source.status}; it has nothing to restore",
            status=source.status,
        )
    dropped = _dropped(platform, source)
    deleted_at = dropped.at if dropped else None
    plan = get_plan(source.plan_type or "free")
    if deleted_at is not None and datetime.now(UTC) - deleted_at > timedelta(days=plan.pitr_days):
        raise Conflict(
            f"project {source.id} was deleted more than {plan.pitr_days} days ago "
            f"({plan.name} plan); it is no longer restorable",
            status=source.status,
        )
    if into == "same" and region is not None and region != source.hosted_region:
        raise InvalidInput(
            f"a restore over the project itself stays where it is ({source.hosted_region}); "
            "use into=new for a copy in another region",
            field="region",
        )
    region = get_region(region or source.region or source.hosted_region or "").id
    require_residency(source.residency, region, what="a restore")
    params: dict[str, Any] = {
        "source_tenant_id": str(source.id),
        "source_server": source.server,
        "source_database": tenant_db_name(source.id),
        "source_deleted": deleted_at is not None,
        # Its database's oid, which its delete recorded (a live one's is read
        # from its server when the restore runs).
        "source_oid": dropped.database_oid if dropped else None,
    }
    restored_from: dict[str, Any] = {"project_id": str(source.id)}
    if backup_id is not None:
        snap = get_snapshot(platform, owner, source.id, backup_id)
        if snap.status != "ok":
            raise Conflict(f"backup {snap.id} is {snap.status}; only a finished one restores")
        require_residency(source.residency, snap.storage_region, what="the backup's storage")
        params["snapshot_id"] = str(snap.id)
        restored_from.update(backup_id=str(snap.id), taken_at=snap.created_at.isoformat())
    else:
        storage = archives.storage_region(platform, source.hosted_region or region, source.server)
        require_residency(source.residency, storage, what="the archive it would come from")
        window, note = archives.restorable_window(platform, source, deleted_at=deleted_at)
        if target_time is None:
            if window is None:
                _in_window(datetime.now(UTC), window, note)
            assert window is not None
            target = window.latest
        else:
            target = target_time if target_time.tzinfo else target_time.replace(tzinfo=UTC)
            _in_window(target, window, note)
        params["target_time"] = target.isoformat()
        if dropped is not None and dropped.restore_point and target >= dropped.at:
            params["restore_point"] = dropped.restore_point
        restored_from["target_time"] = target.isoformat()
    if into == "same":
        return _start_in_place(platform, owner, source, region, name, params, restored_from)
    new_name = name or f"{source.name[:89]} (restored)"
    return tenants.start_create_project(
        platform,
        owner,
        name=new_name,
        region=region,
        plan_type=source.plan_type or "free",
        residency=source.residency,
        restored_from=restored_from,
        op_type="restore",
        op_params=params,
        action="project.restore",
        deadline_s=BACKUP_DEADLINE_S,
        check=lambda conn: _check_copies(conn, owner.id),
        wait_for_region=wait_for_region,
    )


def _start_in_place(
    platform: Platform,
    owner: Owner,
    source: Tenant,
    region: str,
    name: str | None,
    params: dict[str, Any],
    restored_from: dict[str, Any],
) -> tuple[Tenant, uuid.UUID]:
    """A restore over the project itself: a safety snapshot recorded with
    the operation, then `restore_in_place`."""
    if source.status != "active":
        raise Conflict(
            f"project {source.id} is {source.status}; restoring over it needs it to be active "
            "(a deleted project is restored into a new one)",
            status=source.status,
        )
    if name is not None:
        raise InvalidInput("name is for a new project (into=new)", field="name")
    hosted = source.hosted_region or region
    storage = archives.storage_region(platform, hosted, source.server)
    sid, record = _snapshot_record(platform, source, hosted, storage, "safety")

    op_id = start_operation(
        platform,
        owner,
        type="restore_in_place",
        tenant_id=source.id,
        tenant_owner=source.owner_id,
        action="project.restore",
        params={**params, "safety_snapshot_id": str(sid), "region": hosted, "into": "same"},
        details={"restored_from": restored_from},
        prepare=record,
        deadline_s=BACKUP_DEADLINE_S,
    )
    with platform.db.connection() as conn:
        bstore.set_operation(conn, sid, op_id)
    return tenants.get_project(platform, owner, source.id), op_id


# ---- the servers' base backups (admins) -------------------------------------


@dataclass(frozen=True)
class ServerBackups:
    server: str
    region: str
    storage_region: str
    backups: list[BaseBackup]
    archiving: archives.ArchiverState | None
    error: str | None = None
    lag_bytes: int | None = None


def server_backups(platform: Platform, owner: Owner) -> list[ServerBackups]:
    if not owner.is_admin:
        raise Forbidden("only an admin sees the servers' base backups")
    out = []
    for server in platform.servers.all(enabled_only=True):
        state, error, lag = None, None, None
        try:
            with platform.servers.admin_connection(server) as conn:
                state = archives.archiver_state(conn)
            lag = check_server(server, timeout_s=1.0).archive_lag_bytes
        except Exception as e:  # a down server still lists its archive
            error = str(e)
        arch = archives.info(platform, server.name)
        out.append(
            ServerBackups(
                server=server.name,
                region=server.region,
                storage_region=archives.storage_region(platform, server.region, server.name),
                backups=list(arch.backups) if arch else [],
                archiving=state,
                error=error,
                lag_bytes=lag,
            )
        )
    return out


def take_base_backup(platform: Platform, owner: Owner, server: str, type: str) -> BaseBackup:
    if not owner.is_admin:
        raise Forbidden("only an admin takes base backups")
    if type not in BACKUP_TYPES:
        raise InvalidInput(
            f"type must be one of {', '.join(BACKUP_TYPES)}, not {type!r}", field="type"
        )
    names = [s.name for s in platform.servers.all(enabled_only=True)]
    if server not in names:
        raise InvalidInput(
            f"unknown server {server!r}; servers are: {', '.join(names)}", field="server"
        )
    return archives.take_base_backup(platform, server, type)


def add_backup_health(platform: Platform, body: dict[str, Any]) -> dict[str, Any]:
    """/health with each server's newest base backup; with the schedule on,
    a server without one, or whose newest is older than its schedule (a
    differential one every PGFLEET_BACKUP_DIFF_EVERY_H, an hour of grace),
    makes its region degraded."""
    if body.get("status") == "down":
        return body
    # A server whose backups leave the jurisdiction of a project on it (the
    # operator changed PGFLEET_BACKUP_REGIONS after it was placed).
    with platform.db.connection() as conn:
        ruled = conn.execute(
            "SELECT DISTINCT t.hosted_region, t.residency, s.name FROM tenants t "
            "JOIN servers s ON s.id = t.server_id "
            "WHERE t.residency IS NOT NULL AND t.status NOT IN ('deleted', 'failed')"
        ).fetchall()
    for hosted, rule, server_name in ruled:
        storage = archives.storage_region(platform, hosted, server_name)
        if not residency_allows(rule, storage):
            body.setdefault("reasons", []).append(
                f"region {hosted}: it hosts projects with residency rule {rule!r} but its "
                f"backups go to {storage}; set PGFLEET_BACKUP_REGIONS back inside {rule}"
            )
            body["status"] = "degraded"
            if hosted in body.get("regions", {}):
                body["regions"][hosted]["status"] = "degraded"
    if archives.archive_of(platform) is None:
        return body
    s = platform.settings
    limit = timedelta(hours=s.backup_diff_every_h + 1)
    now = datetime.now(UTC)
    for region_id, region in body.get("regions", {}).items():
        for srv in region.get("servers", []):
            arch = archives.info(platform, srv["name"])
            if arch is None and archives.stanza_of(platform, srv["name"]) is not None:
                region["status"] = "degraded"
                body["status"] = "degraded"
                body.setdefault("reasons", []).append(
                    f"region {region_id}: the archive of server {srv['name']} cannot be read "
                    "(its backup storage is unreadable or missing)"
                )
            newest = arch.newest if arch else None
            srv["base_backup"] = {
                "storage_region": archives.storage_region(platform, region_id, srv["name"]),
                "newest": newest.label if newest else None,
                "type": newest.type if newest else None,
                "at": newest.stopped_at.isoformat() if newest else None,
                "count": len(arch.backups) if arch else 0,
            }
            if not s.backup_schedule or arch is None:
                continue
            problem = None
            if newest is None:
                problem = "has no base backup yet (point-in-time restore is not possible)"
            elif now - newest.stopped_at > limit:
                age = (now - newest.stopped_at).total_seconds() / 3600
                problem = f"has no base backup newer than {age:.0f} h (its schedule wants one "
                problem += f"every {s.backup_diff_every_h:g} h)"
            if problem:
                region["status"] = "degraded"
                body.setdefault("reasons", []).append(
                    f"region {region_id}: server {srv['name']} {problem}"
                )
                body["status"] = "degraded"
    return body


# What the workers' own backup work is recorded as (audit and operations).
SYSTEM = Owner(uuid.UUID(int=0), "pgfleet", True)


def due_snapshots(platform: Platform, now: datetime | None = None) -> list[uuid.UUID]:
    """Active projects whose plan schedules snapshots and whose newest one
    (finished or running) is older than the plan's interval."""
    now = now or datetime.now(UTC)
    with platform.db.connection() as conn:
        rows = conn.execute("SELECT id, plan_type FROM tenants WHERE status = 'active'").fetchall()
        latest = bstore.latest_scheduled(conn)
    out = []
    for tid, plan_id in rows:
        plan = get_plan(plan_id or "free")
        every = timedelta(hours=plan.snapshot_every_h) if plan.snapshot_every_h else None
        if retention.snapshot_due(latest.get(tid), every=every, now=now):
            out.append(tid)
    return out


@REGISTRY.every("scheduled_snapshots", lambda s: 600.0)
def scheduled_snapshots(platform: Platform) -> list[str]:
    """Start the snapshots the plans schedule (an operation each, so they
    queue behind whatever else the project is doing), at most 50 a round."""
    if not platform.settings.backup_schedule:
        return []
    prune_deleted(platform)
    started = []
    for tid in due_snapshots(platform)[:50]:
        try:
            sid, _ = start_snapshot(platform, SYSTEM, tid, reason="scheduled")
            started.append(str(sid))
        except (Conflict, PgfleetError) as e:
            log.info("no scheduled snapshot of %s now: %s", tid, e)
    return started


def prune_deleted(platform: Platform, now: datetime | None = None) -> list[str]:
    """Snapshots of projects deleted longer ago than their plan keeps a
    deleted project restorable: files removed, rows expired."""
    now = now or datetime.now(UTC)
    with platform.db.connection() as conn:
        rows = conn.execute(
            "SELECT s.id, s.path, t.plan_type, t.deleted_at FROM snapshots s "
            "JOIN tenants t ON t.id = s.tenant_id "
            "WHERE s.status = 'ok' AND t.status = 'deleted' AND t.deleted_at IS NOT NULL"
        ).fetchall()
    gone = []
    for sid, path, plan_id, deleted_at in rows:
        if now - deleted_at > timedelta(days=get_plan(plan_id or "free").pitr_days):
            Path(path).unlink(missing_ok=True)
            with platform.db.connection() as conn:
                bstore.expire(conn, sid)
            gone.append(str(sid))
    return gone
