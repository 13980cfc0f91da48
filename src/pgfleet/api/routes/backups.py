"""Backups: a project's snapshots and restorable window, restores, and the
servers' base backups (admins)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from pgfleet.api.deps import OwnerDep, PlatformDep
from pgfleet.api.idempotency import encoded, run_idempotent
from pgfleet.api.routes.common import (
    ERRORS,
    OPERATION_ERRORS,
    IdemHeader,
    WaitForRegionQuery,
    WaitQuery,
    created,
    project_and_op,
)
from pgfleet.api.schemas import (
    ArchivingOut,
    BackupList,
    BaseBackupIn,
    BaseBackupOut,
    ErrorResponse,
    OperationOut,
    ProjectCreated,
    ProjectWithOperation,
    RestoreIn,
    ServerBackupList,
    ServerBackupsOut,
    SnapshotOut,
    SnapshotWithOperation,
    WindowOut,
)
from pgfleet.backups import service
from pgfleet.operations import service as ops_service
from pgfleet.operations.store import get_operation

router = APIRouter()


@router.post(
    "/projects/{project_id}/backups",
    tags=["backups"],
    status_code=201,
    summary="Take a snapshot of a project",
    response_model=SnapshotWithOperation,
    responses={202: {"model": SnapshotWithOperation}, **OPERATION_ERRORS},
)
def create_backup(
    project_id: str,
    platform: PlatformDep,
    owner: OwnerDep,
    wait: WaitQuery = True,
    idempotency_key: IdemHeader = None,
) -> JSONResponse:
    """Starts a `snapshot` operation: a `pg_dump -Fc` of the project's
    database taken as the project's own role (never a superuser), written
    into its server's backup region with its size, SHA-256 and PostgreSQL
    version, and a manifest of every table's row count and checksum. It is
    listed as `running` until it is complete and checked; only `ok` ones
    restore. 201 when finished, 202 while it runs."""

    def produce() -> tuple[int, Any]:
        sid, op_id = service.start_snapshot(platform, owner, project_id)
        op = ops_service.wait_or_raise(platform, op_id) if wait else _operation(platform, op_id)
        snap = service.get_snapshot(platform, owner, project_id, sid)
        body = SnapshotWithOperation(
            backup=SnapshotOut.from_row(snap), operation=OperationOut.from_row(op)
        )
        return (201 if op.status == "finished" else 202), body

    return run_idempotent(
        platform,
        owner,
        idempotency_key,
        method="POST",
        path=f"/v1/projects/{project_id}/backups",
        body={"wait": wait},
        produce=produce,
    )


def _operation(platform: Any, op_id: Any) -> Any:
    with platform.db.connection() as conn:
        return get_operation(conn, op_id)


@router.get(
    "/projects/{project_id}/backups",
    tags=["backups"],
    summary="List a project's snapshots and restorable window",
    responses={404: ERRORS[404]},
)
def list_backups(project_id: str, platform: PlatformDep, owner: OwnerDep) -> BackupList:
    """The project's snapshots (newest first; expired ones are gone) and the
    window a point-in-time restore reaches. A deleted project is listed
    too: it stays restorable for its plan's retention."""
    b = service.list_backups(platform, owner, project_id)
    return BackupList(
        project_id=b.project.id,
        storage_region=b.storage_region,
        restorable_window=WindowOut(**asdict(b.window)) if b.window else None,
        window_note=b.window_note,
        backups=[SnapshotOut.from_row(s) for s in b.snapshots],
    )


@router.post(
    "/projects/{project_id}/restore",
    tags=["backups"],
    status_code=201,
    summary="Restore a project into a new project",
    response_model=ProjectCreated,
    responses={
        200: {
            "model": ProjectWithOperation,
            "description": "into=same: the project, restored, and the finished operation.",
        },
        202: {
            "model": ProjectCreated | ProjectWithOperation,
            "description": "The restore is still running (`into: new`: the same body as "
            "201 with `connection` null; `into: same`: the project and the operation).",
        },
        **OPERATION_ERRORS,
        403: {
            "model": ErrorResponse,
            "description": "A new project would pass your project quota (`quota_exceeded`).",
        },
        409: {
            "description": "The project cannot be restored now, or the chosen region is "
            "outside its residency rule (`residency_violation`, naming rule and region).",
            **OPERATION_ERRORS[409],
        },
        422: {
            "description": "Invalid input, or a target_time outside the restorable window "
            "(the message and `earliest`/`latest` name the window).",
            **ERRORS[422],
        },
        503: {
            "model": ErrorResponse,
            "description": "`into: new`: the new project's server failed its last health "
            "check, or could not be reached for about 10 s while the new project was made "
            "(see `wait_for_region`; the copy's own steps retry until the restore's "
            "deadline).",
        },
    },
)
def restore_project(
    project_id: str,
    body: RestoreIn,
    platform: PlatformDep,
    owner: OwnerDep,
    wait: WaitQuery = True,
    wait_for_region: WaitForRegionQuery = False,
    idempotency_key: IdemHeader = None,
) -> JSONResponse:
    """`into: new` (the default) starts a `restore` operation that makes a
    new project in `region` and fills it with the project's data as of
    `target_time` (from its server's continuous archive: base backup plus
    WAL, replayed in a scratch instance) or from the snapshot `backup_id`.
    The copy is verified (every table's row count and checksum against the
    source) before the new project opens; a failed restore removes it again.
    The original is never written to; a deleted project can be restored for
    its plan's retention. 201 with the new project's credentials when
    finished, 202 while it runs (follow the operation).

    `into: same` starts a `restore_in_place`: a safety snapshot of the
    project as it is, the copy loaded into a staging database beside it and
    verified there, then swapped in by renaming (logins are blocked and
    sessions ended for that moment; credentials do not change). Until the
    swap the project is untouched. 200 with the project and the operation
    when finished, 202 while it runs.

    `wait_for_region` is for `into: new`, whose new project's server is
    asked as a create's is; `into: same` always waits for the project's own
    server, which holds its data."""

    def produce() -> tuple[int, Any]:
        _, op_id = service.start_restore(
            platform,
            owner,
            project_id,
            target_time=body.target_time,
            backup_id=str(body.backup_id) if body.backup_id else None,
            region=body.region,
            into=body.into,
            name=body.name,
            wait_for_region=wait_for_region,
        )
        status, out = project_and_op(platform, owner, op_id, wait=wait, credentials=True)
        if body.into == "same":
            return status, out  # the project itself: its credentials did not change
        return created(status, out)

    return run_idempotent(
        platform,
        owner,
        idempotency_key,
        method="POST",
        path=f"/v1/projects/{project_id}/restore",
        # The flag only when set: a key recorded before it existed still replays.
        body={"body": body, "wait": wait, **({"wait_for_region": True} if wait_for_region else {})},
        produce=produce,
    )


@router.get(
    "/admin/base-backups",
    tags=["admin"],
    summary="The servers' base backups and WAL archiving",
    responses={403: ERRORS[403]},
)
def list_base_backups(platform: PlatformDep, owner: OwnerDep) -> ServerBackupList:
    """Per server: where its backups go, its base backups (pgBackRest), and
    the state of its WAL archiving (pg_stat_archiver)."""
    out = []
    for sb in service.server_backups(platform, owner):
        out.append(
            ServerBackupsOut(
                server=sb.server,
                region=sb.region,
                storage_region=sb.storage_region,
                backups=[BaseBackupOut(**_base(b)) for b in sb.backups],
                archiving=_archiving(sb.archiving),
                lag_bytes=sb.lag_bytes,
                error=sb.error,
            )
        )
    return ServerBackupList(servers=out)


def _base(b: Any) -> dict[str, Any]:
    d = asdict(b)
    return {k: d[k] for k in BaseBackupOut.model_fields}


def _archiving(a: Any) -> ArchivingOut | None:
    if a is None:
        return None
    return ArchivingOut(
        archive_mode=a.archive_mode,
        archived_count=a.archived_count,
        last_archived_wal=a.last_archived_wal,
        last_archived_at=a.last_archived_at,
        failed_count=a.failed_count,
        last_failed_at=a.last_failed_at,
        failing=a.failing,
    )


@router.post(
    "/admin/base-backups",
    tags=["admin"],
    status_code=201,
    summary="Take a base backup of a server now",
    responses={403: ERRORS[403], 409: OPERATION_ERRORS[409], 422: ERRORS[422]},
)
def take_base_backup(body: BaseBackupIn, platform: PlatformDep, owner: OwnerDep) -> JSONResponse:
    """A full, differential or incremental base backup of one server, now
    (the workers also take them on schedule); answers when it is done."""
    b = service.take_base_backup(platform, owner, body.server, body.type)
    return JSONResponse(encoded(BaseBackupOut(**_base(b))), status_code=201)
