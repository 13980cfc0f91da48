"""The fleet, for admins: servers and the reconciler."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from pgfleet.api.deps import AdminDep, PlatformDep
from pgfleet.api.idempotency import run_idempotent
from pgfleet.api.routes.common import (
    IdemHeader,
)
from pgfleet.api.schemas import ErrorResponse, OperationOut, ReconcileIn, ServerOut
from pgfleet.errors import NotFound
from pgfleet.operations import service as ops_service
from pgfleet.operations.store import audit, get_operation
from pgfleet.tenants.reconcile import last_run, reconcile

router = APIRouter()


@router.get("/admin/servers", tags=["admin"], summary="Registered regional servers")
def list_servers(platform: PlatformDep, admin: AdminDep) -> list[ServerOut]:
    loads = {s.id: s.tenants for s in platform.servers.loads()}
    return [
        ServerOut(
            id=s.id,
            name=s.name,
            region=s.region,
            host=s.host,
            port=s.port,
            sslmode=s.sslmode,
            sslrootcert=s.sslrootcert,
            capacity=s.capacity,
            tenants=loads.get(s.id, 0),
            is_primary=s.is_primary,
            enabled=s.enabled,
            embedded=s.embedded,
        )
        for s in platform.servers.all()
    ]


@router.post(
    "/admin/reconcile",
    tags=["admin"],
    summary="Compare the platform DB with the servers (and repair)",
    responses={
        200: {"description": "The report (without repair), or the finished repair operation."},
        202: {"model": OperationOut, "description": "The repair operation, still running."},
    },
)
def admin_reconcile(
    platform: PlatformDep,
    admin: AdminDep,
    body: ReconcileIn | None = None,
    wait: Annotated[
        bool,
        Query(
            description="With repair: wait for the `reconcile` operation to end (up to "
            "PGFLEET_OPERATION_WAIT_S) and answer 200 with it, instead of 202 at once."
        ),
    ] = False,
    idempotency_key: IdemHeader = None,
) -> JSONResponse:
    """Reports orphan tenant databases and roles, projects whose database,
    roles, owner, grants or login state are wrong, tenant roles with an
    attribute, setting, membership or password other than pgfleet gave
    them, and projects stuck provisioning: answered at once (200) with the
    report. With `repair` a `reconcile` operation fixes them (202 with the
    operation; its result holds the report): an orphan database that holds
    data is dropped only with `force` as well; projects with an operation in
    flight are left to their worker."""
    req = body or ReconcileIn()

    def produce() -> tuple[int, Any]:
        if req.repair:
            op_id = ops_service.start_operation(
                platform,
                admin,
                type="reconcile",
                tenant_id=None,
                tenant_owner=None,
                action="fleet.reconcile",
                params={"repair": True, "force": req.force},
            )
            if wait:
                op = ops_service.wait(platform, op_id)
            else:
                with platform.db.connection() as conn:
                    op = get_operation(conn, op_id)
            status = 200 if op.status in ("finished", "failed", "cancelled") else 202
            return status, OperationOut.from_row(op)
        with platform.db.connection() as conn:
            audit(
                conn,
                actor=admin.actor,
                owner_id=admin.id,
                action="fleet.reconcile",
                details={"repair": False, "force": req.force},
            )
        return 200, reconcile(platform, repair=False, force=req.force, actor=admin.actor)

    return run_idempotent(
        platform,
        admin,
        idempotency_key,
        method="POST",
        path="/v1/admin/reconcile",
        body={"body": req, "wait": wait},
        produce=produce,
    )


@router.get(
    "/admin/reconcile",
    tags=["admin"],
    summary="The last reconciler run",
    responses={404: {"model": ErrorResponse, "description": "The reconciler has not run yet."}},
)
def admin_last_reconcile(platform: PlatformDep, admin: AdminDep) -> dict[str, Any]:
    run = last_run(platform)
    if run is None:
        raise NotFound("the reconciler has not run yet")
    return dict(run)
