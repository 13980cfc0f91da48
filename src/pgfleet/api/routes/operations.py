"""Operations and the audit log."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from pgfleet.api.deps import AdminDep, OwnerDep, PlatformDep
from pgfleet.api.idempotency import run_idempotent
from pgfleet.api.routes.common import (
    ERRORS,
    IdemHeader,
    audit_out,
)
from pgfleet.api.schemas import (
    AuditList,
    ErrorResponse,
    OperationList,
    OperationOut,
)
from pgfleet.operations import service as ops_service
from pgfleet.operations.store import list_audit
from pgfleet.tenants import service

router = APIRouter()


@router.get(
    "/projects/{project_id}/operations",
    tags=["operations"],
    summary="A project's operations, newest first",
    responses={404: ERRORS[404]},
)
def project_operations(
    project_id: str,
    platform: PlatformDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> OperationList:
    project = service.get_project(platform, owner, project_id, include_deleted=True)
    rows = ops_service.project_operations(platform, project.id, limit=limit)
    return OperationList(operations=[OperationOut.from_row(r) for r in rows])


@router.get(
    "/projects/{project_id}/audit",
    tags=["operations"],
    summary="Who did what to this project, newest first",
    responses={404: ERRORS[404]},
)
def project_audit(
    project_id: str,
    platform: PlatformDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditList:
    project = service.get_project(platform, owner, project_id, include_deleted=True)
    with platform.db.connection() as conn:
        rows = list_audit(conn, tenant_id=project.id, limit=limit)
    return AuditList(entries=[audit_out(r) for r in rows])


@router.get(
    "/operations",
    tags=["operations"],
    summary="Your operations (all of them for an admin), newest first",
)
def list_operations(
    platform: PlatformDep,
    owner: OwnerDep,
    status: Annotated[
        Literal["scheduled", "running", "finished", "failed", "cancelled"] | None, Query()
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> OperationList:
    rows = ops_service.owner_operations(platform, owner, status=status, limit=limit)
    return OperationList(operations=[OperationOut.from_row(r) for r in rows])


@router.get(
    "/operations/{operation_id}",
    tags=["operations"],
    summary="One operation with its steps",
    responses={404: ERRORS[404]},
)
def get_operation_route(operation_id: str, platform: PlatformDep, owner: OwnerDep) -> OperationOut:
    return OperationOut.from_row(ops_service.visible_operation(platform, owner, operation_id))


@router.post(
    "/operations/{operation_id}/cancel",
    tags=["operations"],
    summary="Cancel a scheduled or running operation",
    response_model=OperationOut,
    responses={
        404: ERRORS[404],
        409: {
            "model": ErrorResponse,
            "description": "The operation has already ended (the message says how), or "
            "is past its point of no return.",
        },
    },
)
def cancel_operation(
    operation_id: str,
    platform: PlatformDep,
    owner: OwnerDep,
    idempotency_key: IdemHeader = None,
) -> JSONResponse:
    """A scheduled operation that has not started ends `cancelled` at once.
    A running one is asked to stop: its worker stops at the next step and
    undoes what it did (the answer shows `cancel_requested`; follow the
    operation until it is `cancelled`)."""

    def produce() -> tuple[int, Any]:
        op = ops_service.cancel_operation(platform, owner, operation_id)
        return (200 if op.status == "cancelled" else 202), OperationOut.from_row(op)

    return run_idempotent(
        platform,
        owner,
        idempotency_key,
        method="POST",
        path=f"/v1/operations/{operation_id}/cancel",
        body=None,
        produce=produce,
    )


@router.get("/admin/audit", tags=["admin"], summary="The audit log across all projects")
def admin_audit(
    platform: PlatformDep, admin: AdminDep, limit: Annotated[int, Query(ge=1, le=5000)] = 200
) -> AuditList:
    with platform.db.connection() as conn:
        rows = list_audit(conn, limit=limit)
    return AuditList(entries=[audit_out(r) for r in rows])
