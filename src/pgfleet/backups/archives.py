"""The servers' continuous archives as the platform sees them: where each
server's backups go, what its archive covers, the restorable window of a
project, and the base backups the workers take on schedule."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from pgfleet.backups import retention
from pgfleet.display import when
from pgfleet.errors import Conflict, FleetError, RegionUnavailable
from pgfleet.fleet.archive import Archive, ArchiveInfo, BaseBackup, Stanza
from pgfleet.fleet.embedded import EmbeddedFleet
from pgfleet.fleet.health import check_server
from pgfleet.fleet.registry import ServerRecord
from pgfleet.operations.registry import REGISTRY
from pgfleet.platform.core import Platform
from pgfleet.regions import backup_region_of, get_plan
from pgfleet.tenants.store import Tenant

log = logging.getLogger(__name__)

_INFO_TTL_S = 5.0
_info_cache: dict[tuple[int, str], tuple[float, ArchiveInfo]] = {}
_info_lock = threading.Lock()
_BASE_BACKUP_LOCK = 0x62617365  # "base"


def fleet_of(p: Platform) -> EmbeddedFleet | None:
    if not p.settings.embedded:
        return None
    return p.component("embedded_fleet", lambda: EmbeddedFleet(p.settings))


def archive_of(p: Platform) -> Archive | None:
    fleet = fleet_of(p)
    return None if fleet is None else fleet.archive


def stanza_of(p: Platform, server_name: str) -> Stanza | None:
    archive = archive_of(p)
    if archive is None:
        return None
    return archive.stanzas.get(server_name)


def storage_region(p: Platform, region: str, server: str | None = None) -> str:
    """Where backups of a server (named `server`, in `region`) are kept."""
    return backup_region_of(region, p.settings.backup_regions, server)


def storage_dir(p: Platform, region: str) -> Path:
    """A region's backup storage (a directory: the embedded fleet's stand-in
    for a region's object store)."""
    return p.settings.home_abs / "backups" / region


def info(p: Platform, server_name: str, *, fresh: bool = False) -> ArchiveInfo | None:
    """What the server's archive holds (None: it has none), cached briefly."""
    archive, stanza = archive_of(p), stanza_of(p, server_name)
    if archive is None or stanza is None:
        return None
    key = (id(p), server_name)
    now = time.monotonic()
    with _info_lock:
        hit = _info_cache.get(key)
    if hit is not None and not fresh and now - hit[0] < _INFO_TTL_S:
        return hit[1]
    try:
        got = archive.info(stanza)
    except FleetError as e:
        log.warning("the archive of %s cannot be read: %s", server_name, e)
        return None
    with _info_lock:
        _info_cache[key] = (now, got)
    return got


@dataclass(frozen=True)
class ArchiverState:
    """pg_stat_archiver of one server (works for any server, embedded or not)."""

    archived_count: int
    last_archived_wal: str | None
    last_archived_at: datetime | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_at: datetime | None
    archive_mode: str

    @property
    def failing(self) -> bool:
        """The newest attempt failed (nothing archived since)."""
        if self.last_failed_at is None:
            return False
        return self.last_archived_at is None or self.last_failed_at > self.last_archived_at


def archiver_state(conn: psycopg.Connection[Any]) -> ArchiverState:
    row = conn.execute(
        "SELECT archived_count, last_archived_wal, last_archived_time, failed_count, "
        "last_failed_wal, last_failed_time, pg_catalog.current_setting('archive_mode') "
        "FROM pg_catalog.pg_stat_archiver"
    ).fetchone()
    assert row is not None
    return ArchiverState(*row)


def switch_and_wait(p: Platform, server: ServerRecord, timeout_s: float = 60) -> str:
    """Close the server's current WAL segment after a commit of our own (so
    recovery to any moment until now finds a commit past it) and wait until
    the archive has it. Returns the segment's name."""
    with p.servers.admin_connection(server) as conn:
        conn.execute("SELECT pg_catalog.txid_current()")
        row = conn.execute(
            "SELECT pg_catalog.pg_walfile_name(pg_catalog.pg_switch_wal())"
        ).fetchone()
        assert row is not None
        segment = str(row[0])
        deadline = time.monotonic() + timeout_s
        while True:
            state = archiver_state(conn)
            if state.last_archived_wal is not None and state.last_archived_wal >= segment:
                return segment
            if time.monotonic() > deadline:
                why = (
                    f"archiving fails (last failure at {state.last_failed_at:%Y-%m-%d %H:%M:%S}Z)"
                    if state.failing and state.last_failed_at
                    else "archiving is behind"
                )
                raise Conflict(
                    f"the archive of {server.name} does not reach the present: {why}; "
                    "see `pgfleet status`",
                    server=server.name,
                )
            time.sleep(0.1)


@dataclass(frozen=True)
class Window:
    """The moments a project can be restored to (both ends included)."""

    earliest: datetime
    latest: datetime


def restorable_window(
    p: Platform, project: Tenant, *, deleted_at: datetime | None = None
) -> tuple[Window | None, str]:
    """The project's restorable window from its server's archive, and a
    note (why there is none, or what bounds it)."""
    if project.server is None:
        return None, "the project was never placed on a server"
    arch = info(p, project.server)
    if arch is None:
        if archive_of(p) is None:
            return None, "point-in-time restore needs continuous archiving (PGFLEET_BACKUPS)"
        if stanza_of(p, project.server) is not None:
            return None, (
                f"the archive of server {project.server} cannot be read now (its backup "
                "storage is unreadable or missing; see /health)"
            )
        return None, f"server {project.server} has no archive pgfleet manages"
    oldest = arch.oldest
    if oldest is None:
        return None, f"server {project.server} has no base backup yet"
    now = datetime.now(UTC)
    plan = get_plan(project.plan_type or "free")
    # pgBackRest records stop times in whole seconds and restores only to a
    # moment after a backup's stop: the next whole second is the first safe.
    first = oldest.stopped_at + timedelta(seconds=1)
    earliest = max(first, retention.pitr_floor(plan, now))
    opened = _opened_at(p, project)
    if opened is not None:
        earliest = max(earliest, opened)
    latest = deleted_at or now
    note = f"the last {plan.pitr_days} days ({plan.name} plan)"
    if deleted_at is not None:
        note = f"until it was deleted, for {plan.pitr_days} days ({plan.name} plan)"
    if latest < earliest:
        if earliest > now - timedelta(seconds=5):
            opens = when(earliest, round_up=True)
            return None, f"nothing is restorable yet: the window opens at {opens}"
        return None, f"nothing restorable is left: {note}"
    return Window(earliest, latest), note


def _opened_at(p: Platform, project: Tenant) -> datetime | None:
    """When the project's database first held what its owner could see:
    the end of the operation that made it (its database may be older: a
    prepared spare, made ahead), else its creation."""
    with p.db.connection() as conn:
        row = conn.execute(
            "SELECT min(finished_at) FROM operations WHERE tenant_id = %s "
            "AND type IN ('provision', 'restore') AND status = 'finished'",
            (project.id,),
        ).fetchone()
    at: datetime | None = row[0] if row and row[0] else project.created_at
    return at


def base_backups(p: Platform, server_name: str) -> list[BaseBackup]:
    arch = info(p, server_name, fresh=True)
    return list(arch.backups) if arch else []


def take_base_backup(p: Platform, server_name: str, type: str) -> BaseBackup:
    archive, stanza = archive_of(p), stanza_of(p, server_name)
    if archive is None or stanza is None:
        raise Conflict(
            f"server {server_name} has no archive pgfleet manages (embedded servers with "
            "PGFLEET_BACKUPS=true only)",
            server=server_name,
        )
    started = time.monotonic()
    try:
        backup = archive.backup(stanza, type)
    except FleetError as e:
        p.metrics.base_backups.labels(stanza.region, type, "failed").inc()
        raise RegionUnavailable(
            f"the {type} backup of {server_name} failed: {e}", server=server_name
        ) from e
    p.metrics.base_backups.labels(stanza.region, type, "ok").inc()
    p.metrics.base_backup_duration.labels(stanza.region, type).observe(time.monotonic() - started)
    info(p, server_name, fresh=True)
    return backup


def due_backups(p: Platform, now: datetime | None = None) -> list[tuple[str, str]]:
    """(server, type) for each server whose schedule wants a base backup."""
    archive = archive_of(p)
    if archive is None:
        return []
    now = now or datetime.now(UTC)
    s = p.settings
    out = []
    for name in archive.stanzas:
        arch = info(p, name, fresh=True)
        if arch is None:
            continue
        fulls = [b for b in arch.backups if b.type == "full"]
        due = retention.base_backup_due(
            last_full=fulls[-1].stopped_at if fulls else None,
            last_any=arch.newest.stopped_at if arch.newest else None,
            full_every=timedelta(hours=s.backup_full_every_h),
            diff_every=timedelta(hours=s.backup_diff_every_h),
            now=now,
        )
        if due is not None:
            out.append((name, due))
    return out


@REGISTRY.every("base_backups", lambda s: 300.0)
def scheduled_base_backups(p: Platform) -> list[str]:
    """Take the base backups the schedule wants (one worker at a time)."""
    archive = archive_of(p)
    if not p.settings.backup_schedule or archive is None:
        return []
    # A repository that went missing (storage replaced, emptied) gets its
    # stanza again, so archiving resumes without anyone running `up`.
    for stanza in archive.stanzas.values():
        try:
            archive.prepare(stanza)
            archive.create(stanza)
        except (FleetError, OSError) as e:
            log.warning("the archive of %s is not ready: %s", stanza.name, e)
    done = []
    with p.db.connection() as conn:
        got = conn.execute("SELECT pg_try_advisory_lock(%s)", (_BASE_BACKUP_LOCK,)).fetchone()
        if not got or not got[0]:
            return []
        try:
            for server, type in due_backups(p):
                try:
                    b = take_base_backup(p, server, type)
                    done.append(b.label)
                except RegionUnavailable as e:
                    log.warning("%s", e)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_BASE_BACKUP_LOCK,))
    return done


def install_gauges(platform: Platform) -> None:
    """WAL archiving in /metrics, read live from each server when scraped:
    pgfleet_archive_lag_bytes (WAL not yet in the archive),
    pgfleet_archive_failing, and the age of the newest base backup."""

    def read() -> dict[str, list[tuple[dict[str, str], float]]]:
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for server in platform.servers.all(enabled_only=True):
            lbl = {"server": server.name, "region": server.region}
            h = check_server(server, timeout_s=1.0)  # a server down is reported, not raised
            if h.archive_lag_bytes is not None:
                out.setdefault("pgfleet_archive_lag_bytes", []).append(
                    (lbl, float(h.archive_lag_bytes))
                )
                out.setdefault("pgfleet_archive_failing", []).append(
                    (lbl, 1.0 if h.archive_failing else 0.0)
                )
            arch = info(platform, server.name)
            if arch is not None and arch.newest is not None:
                age = (datetime.now(UTC) - arch.newest.stopped_at).total_seconds()
                out.setdefault("pgfleet_base_backup_age_seconds", []).append((lbl, age))
        return out

    platform.metrics.add_state(read)
