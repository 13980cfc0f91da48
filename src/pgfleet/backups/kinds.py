"""The backups domain's operation kinds:

- `snapshot`: dump (pg_dump as the project's own role, with a manifest of
  its tables read in the same snapshot; written aside, checked, then
  renamed into place), prune (the plan's retention);
- `restore`: the new project's place, roles, database and privileges (as a
  provision), fetch (a point in time from the server's archive into a
  scratch instance and dumped from there, or a snapshot checked against its
  SHA-256), load (pg_restore as the new project's role, in one transaction),
  verify (every table's row count and checksum against the source's
  manifest), then activate, route, and clean up the scratch copy.

A failed or cancelled restore drops the new project again; the source
project is never written to.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgfleet.backups import archives, retention
from pgfleet.backups import store as bstore
from pgfleet.backups.dump import (
    StopReason,
    cancelled_on_stop,
    compare,
    fsync_file,
    manifest,
    pg_dump,
    pg_restore,
    setup_session,
    sha256_of,
)
from pgfleet.display import when
from pgfleet.errors import BackupUnusable, Conflict, FleetError, RegionUnavailable
from pgfleet.fleet.binaries import find_binaries
from pgfleet.fleet.embedded import ADMIN_USER
from pgfleet.operations.failpoints import failpoint
from pgfleet.operations.registry import OpContext, OperationKind, Step, register
from pgfleet.platform.core import Platform
from pgfleet.regions import get_plan
from pgfleet.tenants.connections import DatabasePlatformClient
from pgfleet.tenants.kinds.common import (
    alter_login_roles,
    end_sessions,
    login_roles,
    project_admin,
    route,
    server_of,
    tenant,
)
from pgfleet.tenants.kinds.provision import (
    BUILD_STEPS,
    OPEN_STEPS,
    cancelled_unstarted,
    undo_provision,
)
from pgfleet.tenants.naming import rw_role_name
from pgfleet.tenants.provisioning import converge_target_on_server, prepare_provision
from pgfleet.tenants.server import drop_database, role_exists

log = logging.getLogger(__name__)


def binary(name: str) -> str:
    return find_binaries().path(name)


def _dump_consistent(
    ci: dict[str, Any], out: Path, stop: StopReason | None = None
) -> tuple[dict[str, Any], str]:
    """pg_dump of the database `ci` names, as its user, and the manifest of
    its tables read in the same snapshot. Returns (manifest, server version)."""
    with psycopg.connect(**ci) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        setup_session(conn)
        row = conn.execute("SELECT pg_catalog.pg_export_snapshot()").fetchone()
        assert row is not None
        snapshot = str(row[0])
        vrow = conn.execute("SELECT pg_catalog.current_setting('server_version')").fetchone()
        assert vrow is not None
        with cancelled_on_stop(conn, stop):
            tables = manifest(conn)
        pg_dump(binary("pg_dump"), ci, out, snapshot=snapshot, stop=stop)
        conn.rollback()
    return tables, str(vrow[0])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- snapshot -----------------------------------------------------------------


def _snapshot_row(ctx: OpContext) -> bstore.Snapshot:
    with ctx.platform.db.connection() as conn:
        snap = bstore.get(conn, uuid.UUID(ctx.params["snapshot_id"]))
    assert snap is not None, "the snapshot's row vanished"
    return snap


def _dump_snapshot(
    p: Platform, tenant_id: uuid.UUID, snap: bstore.Snapshot, stop: StopReason | None = None
) -> dict[str, Any]:
    """Write snapshot `snap` of the project: dumped aside as its own role,
    fsynced, hashed, renamed into place, recorded `ok`."""
    ep = DatabasePlatformClient.of(p).endpoint(tenant_id)
    ci = {**ep.conninfo("rw", p.settings.connect_timeout_s), "application_name": "pgfleet-backup"}
    final = Path(snap.path)
    partial = final.with_name(final.name + ".partial")
    final.parent.mkdir(parents=True, exist_ok=True)
    for d in (final.parent.parent, final.parent):
        os.chmod(d, 0o700)  # the projects' dumps: pgfleet's own user only
    started = time.monotonic()
    tables, version = _dump_consistent(ci, partial, stop)
    failpoint("snapshot.dump.written")
    fsync_file(partial)
    digest = sha256_of(partial)
    size = partial.stat().st_size
    os.replace(partial, final)
    _fsync_dir(final.parent)
    with p.db.connection() as conn:
        bstore.finish(
            conn, snap.id, size_bytes=size, sha256=digest, pg_version=version, tables=tables
        )
    region = snap.source_region or ""
    p.metrics.snapshots.labels(region, "ok").inc()
    p.metrics.snapshot_bytes.labels(region).inc(size)
    p.metrics.snapshot_duration.labels(region).observe(time.monotonic() - started)
    return {"size_bytes": size, "sha256": digest, "tables": len(tables)}


def _snapshot_dump(ctx: OpContext) -> None:
    snap = _snapshot_row(ctx)
    if snap.status == "ok":
        return  # done before a crash
    ctx.state.update(_dump_snapshot(ctx.platform, ctx.tenant_id, snap, ctx.stop_reason))


def prune_snapshots(p: Platform, tenant_id: uuid.UUID, plan_id: str | None) -> list[str]:
    """The project's snapshots its plan no longer keeps: files removed, rows
    `expired`. Returns their ids."""
    plan = get_plan(plan_id or "free")
    with p.db.connection() as conn:
        snaps = bstore.of_tenant(conn, tenant_id, statuses=("ok",))
    doomed = retention.snapshots_to_delete(
        [retention.Kept(str(s.id), s.created_at) for s in snaps],
        keep=plan.snapshot_keep,
        max_age=timedelta(days=plan.snapshot_max_age_days),
        now=datetime.now(UTC),
    )
    by_id = {str(s.id): s for s in snaps}
    for k in doomed:
        Path(by_id[k.id].path).unlink(missing_ok=True)
        with p.db.connection() as conn:
            bstore.expire(conn, uuid.UUID(k.id))
    return [k.id for k in doomed]


def _snapshot_prune(ctx: OpContext) -> None:
    row = tenant(ctx.platform, ctx.tenant_id)
    ctx.state["expired"] = prune_snapshots(ctx.platform, ctx.tenant_id, row.plan_type)


def _snapshot_failed(ctx: OpContext, reason: str | None = None) -> None:
    snap = _snapshot_row(ctx)
    final = Path(snap.path)
    final.with_name(final.name + ".partial").unlink(missing_ok=True)
    if snap.status == "running":
        final.unlink(missing_ok=True)
        with ctx.platform.db.connection() as conn:
            bstore.fail(conn, snap.id, reason or "cancelled")
        ctx.platform.metrics.snapshots.labels(snap.source_region or "", "failed").inc()


SNAPSHOT = register(
    OperationKind(
        name="snapshot",
        description="dump the project's database (as its own role) into its backup region",
        steps=(Step("dump", _snapshot_dump), Step("prune", _snapshot_prune)),
        on_failure=_snapshot_failed,
        on_cancel=_snapshot_failed,
    )
)


# ---- restore --------------------------------------------------------------------


def _scratch_key(ctx: OpContext) -> str:
    return f"restore-{ctx.op.id}"


def _work_dir(ctx: OpContext) -> Path:
    """Where a restore keeps its dump of the source (beside the scratch
    instance's data directory)."""
    fleet = archives.fleet_of(ctx.platform)
    if fleet is not None:
        return fleet.scratch_dir() / _scratch_key(ctx)
    return ctx.platform.settings.home_abs / "scratch" / _scratch_key(ctx)


def _fetch_pitr(ctx: OpContext) -> None:
    p = ctx.platform
    fleet = archives.fleet_of(p)
    archive = archives.archive_of(p)
    source_server = str(ctx.params["source_server"])
    stanza = archives.stanza_of(p, source_server)
    if fleet is None or archive is None or stanza is None:
        raise Conflict(f"server {source_server} has no archive to restore from")
    target = datetime.fromisoformat(ctx.params["target_time"])
    server = next((s for s in p.servers.all() if s.name == source_server), None)
    if server is not None:
        try:
            archives.switch_and_wait(p, server)
        except RegionUnavailable:
            # The source server is down: restore from what its archive has
            # (the reason backups live in another region).
            log.warning("restoring %s from the archive alone: its server is down", source_server)
    db = str(ctx.params["source_database"])
    scratch = fleet.scratch(_scratch_key(ctx))
    scratch.stop()
    # A deleted project's latest moment is the restore point its delete
    # made just before the drop (see tenants/kinds/delete.py).
    point = ctx.params.get("restore_point")
    # The base backup recovery starts from: the newest that ended before the
    # target. Only when the database is in it can the others be left out.
    info = archive.info(stanza)
    before = [b for b in info.backups if b.stopped_at < target]
    if not before:
        raise Conflict(f"no base backup of {source_server} ends before {when(target)}")
    base = before[-1]
    ctx.state["base_backup"] = base.label
    # Only the project's database comes back with its files: found by its
    # oid (a spare of an earlier version had another name then), or, made
    # after the base backup, from the WAL with every other database left out.
    held = archive.backup_databases(stanza, base.label)
    oid = _source_oid(ctx, server, db)
    include: str | None = None
    exclude: tuple[str, ...] = ()
    if oid is not None and oid in held:
        include = held[oid]
    elif oid is not None:
        exclude = tuple(name for name in held.values() if name != "postgres")
    # What came back with its files, for the record (and the tests).
    ctx.state["files_restored"] = (
        f"only {include}"
        if include
        else f"all but {len(exclude)} other databases"
        if oid is not None
        else "the whole server (the database's oid is unknown)"
    )
    try:
        archive.restore(
            stanza,
            scratch.data_dir,
            target_time=target,
            target_name=point,
            backup_set=base.label,
            include=include,
            exclude=exclude,
        )
        failpoint("restore.fetch.restored")
        scratch.start()
    except FleetError as e:
        # Is the archive itself damaged? pgBackRest's verify checks every
        # file's checksum in the repository.
        ok, report = archive.verify(stanza)
        if not ok:
            raise BackupUnusable(
                f"the archive of {source_server} is damaged, so it cannot be restored "
                f"from ({e}); pgBackRest's verify reports: {report[-800:]}",
                server=source_server,
            ) from e
        raise
    try:
        rw = rw_role_name(db)
        with scratch.connect("postgres", ADMIN_USER) as conn:
            setup_session(conn)
            found = conn.execute(
                "SELECT (SELECT true FROM pg_catalog.pg_database WHERE datname = %s), "
                "(SELECT true FROM pg_catalog.pg_roles WHERE rolname = %s)",
                (db, rw),
            ).fetchone()
            if found is None or not found[0] or not found[1]:
                raise Conflict(
                    f"the project's database did not exist at {when(target)}; choose a later time",
                )
            # Paused at that moment: its role may not log in; the copy is ours.
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(rw)))
        out = scratch.data_dir.parent / "source.dump"
        tables, _ = _dump_consistent(scratch.conninfo(db, rw), out, ctx.stop_reason)
    except psycopg.Error as e:
        # Not a passing trouble: the restored copy is what it is.
        raise FleetError(f"the restored copy cannot be read: {e}") from e
    finally:
        scratch.stop()
    shutil.rmtree(scratch.data_dir, ignore_errors=True)
    ctx.state.update(dump=str(out), manifest=tables)


def _source_oid(ctx: OpContext, server: Any, db: str) -> int | None:
    """The oid of the source project's database: on its server, or as its
    delete recorded it (None: unknown, the whole server is restored)."""
    if ctx.params.get("source_oid") is not None:
        return int(ctx.params["source_oid"])
    if server is None:
        return None
    try:
        with ctx.platform.servers.admin_connection(server) as conn:
            row = conn.execute(
                "SELECT oid FROM pg_catalog.pg_database WHERE datname = %s", (db,)
            ).fetchone()
    except RegionUnavailable:
        return None
    return int(row[0]) if row else None


def _fetch_snapshot(ctx: OpContext) -> None:
    p = ctx.platform
    with p.db.connection() as conn:
        snap = bstore.get(conn, uuid.UUID(ctx.params["snapshot_id"]))
    if snap is None or snap.status != "ok" or snap.sha256 is None:
        raise BackupUnusable(f"snapshot {ctx.params['snapshot_id']} is not usable")
    path = Path(snap.path)
    if not path.is_file():
        raise BackupUnusable(
            f"snapshot {snap.id} is missing from the storage in {snap.storage_region}"
        )
    digest = sha256_of(path)
    if digest != snap.sha256:
        raise BackupUnusable(
            f"snapshot {snap.id} is damaged: its SHA-256 is {digest}, recorded {snap.sha256}; "
            "it cannot be restored"
        )
    ctx.state.update(dump=str(path), manifest=snap.tables or {})


def _fetch(ctx: OpContext) -> None:
    if ctx.state.get("dump") and Path(ctx.state["dump"]).is_file():
        return
    if ctx.params.get("snapshot_id"):
        _fetch_snapshot(ctx)
    else:
        _fetch_pitr(ctx)


def _new_project_conninfo(ctx: OpContext) -> dict[str, Any]:
    t = prepare_provision(ctx.platform, ctx.tenant_id)
    out: dict[str, Any] = {
        "host": t.server.host,
        "port": t.server.port,
        "dbname": t.name,
        "user": t.rw_user,
        "password": t.password,
        "sslmode": t.server.sslmode,
        "connect_timeout": max(1, round(ctx.platform.settings.connect_timeout_s)),
        "application_name": "pgfleet-restore",
    }
    if t.server.sslrootcert:
        out["sslrootcert"] = t.server.sslrootcert
    return out


def _has_tables(ci: dict[str, Any]) -> bool:
    with psycopg.connect(**ci, autocommit=True) as conn:
        setup_session(conn)
        return bool(manifest_names(conn))


def manifest_names(conn: psycopg.Connection[Any]) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
            "ON n.oid OPERATOR(pg_catalog.=) c.relnamespace WHERE c.relkind IN ('r', 'p', 'v', "
            "'m', 'S', 'f') AND n.nspname <> ALL (ARRAY['pg_catalog', 'information_schema']) "
            "AND n.nspname NOT LIKE 'pg\\_%%' LIMIT 1"
        ).fetchall()
    ]


def end_stale_loads(ctx: OpContext, database: str) -> None:
    """A pg_restore that a killed worker left running into `database` is
    ended (its one transaction rolls back) before the load runs again."""
    with project_admin(ctx.platform, _project_server(ctx), ctx.tenant_id) as conn:
        conn.execute(
            "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity "
            "WHERE datname = %s AND application_name = 'pgfleet-restore' "
            "AND pid <> pg_catalog.pg_backend_pid()",
            (database,),
        )
        deadline = time.monotonic() + 30
        while conn.execute(
            "SELECT 1 FROM pg_catalog.pg_stat_activity WHERE datname = %s "
            "AND application_name = 'pgfleet-restore' AND pid <> pg_catalog.pg_backend_pid()",
            (database,),
        ).fetchone():
            if time.monotonic() > deadline:
                raise FleetError(f"an earlier load into {database} does not end")
            time.sleep(0.1)


def _load_into(ctx: OpContext, ci: dict[str, Any], loaded_point: str | None = None) -> None:
    """The fetched dump into the empty database `ci` names, as its role. A
    load that committed before a crash left its tables: verify decides."""
    if ctx.state.get("loaded"):
        return
    end_stale_loads(ctx, ci["dbname"])
    if not _has_tables(ci):
        pg_restore(binary("pg_restore"), ci, Path(ctx.state["dump"]), stop=ctx.stop_reason)
        if loaded_point:
            failpoint(loaded_point)
    ctx.state["loaded"] = True


def _verify_against_source(ctx: OpContext, ci: dict[str, Any]) -> None:
    """Every table of the database `ci` names against the source's manifest."""
    with psycopg.connect(**ci) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        setup_session(conn)
        with cancelled_on_stop(conn, ctx.stop_reason):
            got = manifest(conn)
        conn.rollback()
    problems = compare(ctx.state.get("manifest") or {}, got)
    if problems:
        raise FleetError(
            "the restored database does not match its source: " + "; ".join(problems[:5])
        )
    ctx.state["verified_tables"] = len(got)
    ctx.state["verified_rows"] = sum(int(t["rows"]) for t in got.values())


def _load(ctx: OpContext) -> None:
    _load_into(ctx, _new_project_conninfo(ctx), "restore.load.loaded")


def _verify(ctx: OpContext) -> None:
    _verify_against_source(ctx, _new_project_conninfo(ctx))


def _clean(ctx: OpContext) -> None:
    _remove_work(ctx)
    p = ctx.platform
    row = tenant(p, ctx.tenant_id)
    source = "snapshot" if ctx.params.get("snapshot_id") else "pitr"
    region = row.hosted_region or ""
    p.metrics.restores.labels(region, source, "ok").inc()
    took = datetime.now(UTC) - ctx.op.created_at
    p.metrics.restore_duration.labels(region, source).observe(took.total_seconds())


def _remove_work(ctx: OpContext) -> None:
    fleet = archives.fleet_of(ctx.platform)
    if fleet is not None and not ctx.params.get("snapshot_id"):
        fleet.scratch(_scratch_key(ctx)).remove()
    work = _work_dir(ctx)
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)


def _restore_undo(ctx: OpContext, reason: str = "cancelled") -> None:
    try:
        _remove_work(ctx)
    except Exception as e:  # the undo of the project must still run
        log.warning("the scratch copy of %s was not removed: %s", ctx.op.id, e)
    source = "snapshot" if ctx.params.get("snapshot_id") else "pitr"
    ctx.platform.metrics.restores.labels(ctx.params.get("region", ""), source, "failed").inc()
    undo_provision(ctx, reason)


RESTORE = register(
    OperationKind(
        name="restore",
        description="restore a project (a point in time or a snapshot) into a new project",
        steps=(
            *BUILD_STEPS,
            Step("fetch", _fetch),
            Step("load", _load),
            Step("verify", _verify),
            *OPEN_STEPS,
            Step("clean", _clean),
        ),
        on_failure=lambda ctx, reason: _restore_undo(ctx, f"restore failed: {reason}"),
        on_cancel=lambda ctx: _restore_undo(ctx, "restore was cancelled"),
        on_cancel_unstarted=cancelled_unstarted,
    )
)


# ---- restore over the project itself ------------------------------------------
#
# The project's data is replaced by a verified copy, never edited in place:
# a safety snapshot first; the copy is loaded into a staging database on the
# same server (owned by the project's role, which a gate role named like it
# admits through pg_hba's samerole), verified there, and then swapped in by
# renaming, with the project's logins blocked for the moment of the swap.
# Until the swap the project is untouched; after it, the operation only
# goes forward.


def _staging(ctx: OpContext) -> str:
    return f"pgfleet_restore_{ctx.op.id.hex[:16]}"


def _replaced(ctx: OpContext) -> str:
    return f"pgfleet_replaced_{ctx.op.id.hex[:16]}"


def _project_server(ctx: OpContext) -> Any:
    row = tenant(ctx.platform, ctx.tenant_id)
    server = server_of(ctx.platform, row)
    if server is None:
        raise Conflict(f"project {ctx.tenant_id} has no server")
    return server


def _safety_snapshot(ctx: OpContext) -> None:
    """The project as it is now, kept as a snapshot (`safety`) before
    anything replaces it."""
    p = ctx.platform
    sid = uuid.UUID(ctx.params["safety_snapshot_id"])
    with p.db.connection() as conn:
        snap = bstore.get(conn, sid)
    assert snap is not None
    if snap.status != "ok":
        _dump_snapshot(p, ctx.tenant_id, snap, ctx.stop_reason)
    ctx.state["safety_snapshot"] = str(sid)


def _stage(ctx: OpContext) -> None:
    """An empty staging database owned by the project's rw role, and a gate
    role named like it that the rw role is a member of."""
    db = str(ctx.params["source_database"])
    stage = _staging(ctx)
    gate, rw = sql.Identifier(stage), sql.Identifier(rw_role_name(db))
    with project_admin(ctx.platform, _project_server(ctx), ctx.tenant_id) as conn:
        if not conn.execute(
            "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (stage,)
        ).fetchone():
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(gate))
        conn.execute(sql.SQL("GRANT {} TO {}").format(gate, rw))
        if not conn.execute(
            "SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", (stage,)
        ).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(gate, rw))
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(gate))


def _stage_conninfo(ctx: OpContext) -> dict[str, Any]:
    ep = DatabasePlatformClient.of(ctx.platform).endpoint(ctx.tenant_id)
    ci = ep.conninfo("rw", ctx.platform.settings.connect_timeout_s)
    return {**ci, "dbname": _staging(ctx), "application_name": "pgfleet-restore"}


def _load_stage(ctx: OpContext) -> None:
    _load_into(ctx, _stage_conninfo(ctx))


def _verify_stage(ctx: OpContext) -> None:
    _verify_against_source(ctx, _stage_conninfo(ctx))


def _swap(ctx: OpContext) -> None:
    """The copy takes the project's database's name; the old one is kept
    aside (dropped by `clean`). Logins are blocked and sessions ended for
    the moment of the renames; each rename is looked for before it is made,
    so a crash in between resumes where it stopped."""
    p = ctx.platform
    db = str(ctx.params["source_database"])
    stage, old = _staging(ctx), _replaced(ctx)
    server = _project_server(ctx)
    roles = login_roles(ctx.tenant_id)

    def exists(conn: psycopg.Connection[Any], name: str) -> bool:
        return bool(
            conn.execute(
                "SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", (name,)
            ).fetchone()
        )

    alter_login_roles(p, ctx.tenant_id, sql.SQL("NOLOGIN"))
    try:
        end_sessions(p, ctx.tenant_id, roles)
        with project_admin(p, server, ctx.tenant_id) as conn:
            if exists(conn, stage) and exists(conn, db):
                conn.execute(
                    "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity "
                    "WHERE datname = ANY(%s) AND pid <> pg_catalog.pg_backend_pid()",
                    ([db, stage],),
                )
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(db), sql.Identifier(old)
                    )
                )
                failpoint("restore_in_place.swap.renamed")
            if exists(conn, stage) and not exists(conn, db):
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(stage), sql.Identifier(db)
                    )
                )
        # What pgfleet sets on a project's database and inside it: ownership,
        # CONNECT for its roles only, the read-only role's grants.
        t = prepare_provision(p, ctx.tenant_id)
        ctx.state.setdefault("actions", []).extend(converge_target_on_server(p, t, "database"))
    finally:
        row = tenant(p, ctx.tenant_id)
        if row.status == "active":
            alter_login_roles(p, ctx.tenant_id, sql.SQL("LOGIN"))
    t = prepare_provision(p, ctx.tenant_id)
    ctx.state["actions"].extend(converge_target_on_server(p, t, "privileges"))


def _drop_stage(ctx: OpContext, *names: str) -> None:
    """The databases `names` and the staging gate role, gone."""
    stage = _staging(ctx)
    rw = rw_role_name(str(ctx.params["source_database"]))
    with project_admin(ctx.platform, _project_server(ctx), ctx.tenant_id) as conn:
        for name in names:
            drop_database(conn, name)
        if role_exists(conn, stage):
            conn.execute(
                sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(stage), sql.Identifier(rw))
            )
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(stage)))


def _clean_in_place(ctx: OpContext) -> None:
    _drop_stage(ctx, _replaced(ctx), _staging(ctx))
    _remove_work(ctx)
    route(ctx)  # router clients of the old database reconnect to the copy
    source = "snapshot" if ctx.params.get("snapshot_id") else "pitr"
    row = tenant(ctx.platform, ctx.tenant_id)
    ctx.platform.metrics.restores.labels(row.hosted_region or "", source, "ok").inc()


def _in_place_undo(ctx: OpContext, reason: str | None = None) -> None:
    """Before the swap the project was never touched: drop the staging
    copy. A swap that failed half-way (the project's database renamed
    aside, the copy not yet in its place) puts the original back first."""
    try:
        _remove_work(ctx)
    except Exception as e:
        log.warning("the scratch copy of %s was not removed: %s", ctx.op.id, e)
    db, old = str(ctx.params["source_database"]), _replaced(ctx)
    with project_admin(ctx.platform, _project_server(ctx), ctx.tenant_id) as conn:
        names = {
            r[0]
            for r in conn.execute(
                "SELECT datname FROM pg_catalog.pg_database WHERE datname = ANY(%s)", ([db, old],)
            )
        }
        if db not in names and old in names:
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(old), sql.Identifier(db)
                )
            )
    if tenant(ctx.platform, ctx.tenant_id).status == "active":
        alter_login_roles(ctx.platform, ctx.tenant_id, sql.SQL("LOGIN"))
    _drop_stage(ctx, _staging(ctx))
    source = "snapshot" if ctx.params.get("snapshot_id") else "pitr"
    ctx.platform.metrics.restores.labels(ctx.params.get("region", ""), source, "failed").inc()


RESTORE_IN_PLACE = register(
    OperationKind(
        name="restore_in_place",
        description="replace the project's data with a verified copy of an earlier state, "
        "after a safety snapshot",
        steps=(
            Step("safety_snapshot", _safety_snapshot),
            Step("fetch", _fetch),
            Step("stage", _stage),
            Step("load", _load_stage),
            Step("verify", _verify_stage),
            Step("swap", _swap, final=True),
            Step("clean", _clean_in_place),
        ),
        on_failure=_in_place_undo,
        on_cancel=_in_place_undo,
    )
)
