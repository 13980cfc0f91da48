"""Projects: create, list, show, delete, the lifecycle operations, connection details."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from pgfleet.api.deps import OwnerDep, PlatformDep
from pgfleet.api.idempotency import encoded, run_idempotent
from pgfleet.api.routes.common import (
    ERRORS,
    OPERATION_ERRORS,
    IdemHeader,
    WaitForRegionQuery,
    WaitQuery,
    conn_out,
    created,
    lifecycle_route,
    project_and_op,
)
from pgfleet.api.schemas import (
    REGION_SCHEMA,
    ConnectionOut,
    ErrorResponse,
    PlanIn,
    ProjectCreate,
    ProjectCreated,
    ProjectList,
    ProjectOut,
    ProjectWithOperation,
    RotateIn,
    UsageOut,
)
from pgfleet.tenants import service

router = APIRouter()


@router.post(
    "/projects",
    tags=["projects"],
    status_code=201,
    summary="Create a project",
    response_model=ProjectCreated,
    responses={
        202: {
            "model": ProjectCreated,
            "description": "Provisioning is still running: the same body as 201, with "
            "`connection` null; follow `operation` at `/v1/operations/{id}`.",
        },
        409: OPERATION_ERRORS[409],
        422: ERRORS[422],
        503: {"model": ErrorResponse, "description": "The region's server cannot be reached."},
    },
)
def create_project(
    body: ProjectCreate,
    platform: PlatformDep,
    owner: OwnerDep,
    wait: WaitQuery = True,
    wait_for_region: WaitForRegionQuery = False,
    idempotency_key: IdemHeader = None,
) -> JSONResponse:
    """Records the project and its `provision` operation, which creates the
    database on a server of the placed region. By default waits for it and
    answers 201 with read-write credentials (the only time the password is
    part of a project response) and the finished operation; with
    `wait=false`, or if provisioning outlasts the wait, answers 202 with the
    operation to follow at `/v1/operations/{id}`."""

    def produce() -> tuple[int, Any]:
        _, op_id = service.start_create_project(
            platform,
            owner,
            name=body.name,
            region=body.region,
            plan_type=body.chosen_plan,
            subdomain=body.subdomain,
            residency=body.residency,
            wait_for_region=wait_for_region,
        )
        return created(*project_and_op(platform, owner, op_id, wait=wait, credentials=True))

    return run_idempotent(
        platform,
        owner,
        idempotency_key,
        method="POST",
        path="/v1/projects",
        body={"body": body, "wait": wait, "wait_for_region": wait_for_region},
        produce=produce,
    )


@router.get("/projects", tags=["projects"], summary="List your projects")
def list_projects(
    platform: PlatformDep,
    owner: OwnerDep,
    region: Annotated[
        str | None,
        Query(
            description="Only projects that asked for this region",
            json_schema_extra=REGION_SCHEMA,
        ),
    ] = None,
    include_deleted: bool = False,
) -> ProjectList:
    rows = service.list_projects(platform, owner, region=region, include_deleted=include_deleted)
    return ProjectList(projects=[ProjectOut.from_row(r) for r in rows])


@router.get(
    "/projects/{project_id}",
    tags=["projects"],
    summary="Show a project",
    responses={404: ERRORS[404]},
)
def get_project(project_id: str, platform: PlatformDep, owner: OwnerDep) -> ProjectOut:
    return ProjectOut.from_row(service.get_project(platform, owner, project_id))


@router.delete(
    "/projects/{project_id}",
    tags=["projects"],
    summary="Delete a project",
    response_model=ProjectWithOperation,
    responses={202: {"model": ProjectWithOperation}, **OPERATION_ERRORS},
)
def delete_project(
    project_id: str, platform: PlatformDep, owner: OwnerDep, wait: WaitQuery = True
) -> JSONResponse:
    """Starts a `delete` operation: drops the project's database and roles on
    its server; the row stays with status `deleted` and its timestamps,
    without connection info. Deleting again is harmless."""
    op_id = service.start_delete_project(platform, owner, project_id)
    status, out = project_and_op(platform, owner, op_id, wait=wait)
    return JSONResponse(encoded(out), status_code=status)


@router.post(
    "/projects/{project_id}/rotate-password",
    tags=["projects"],
    summary="Rotate the project's passwords",
    response_model=ProjectWithOperation,
    responses={202: {"model": ProjectWithOperation}, **OPERATION_ERRORS},
)
def rotate_password(
    project_id: str,
    platform: PlatformDep,
    owner: OwnerDep,
    body: RotateIn | None = None,
    wait: WaitQuery = True,
    idempotency_key: IdemHeader = None,
) -> JSONResponse:
    """Starts a `rotate_password` operation: new passwords for the read-write
    and/or read-only login role. The new ones work as soon as it finishes and
    the old ones stop working for new connections at that moment, or, with
    `overlap_s`, when that window ends (an `expire_credentials` operation).
    Sessions that logged in with a password that no longer holds end then,
    on the server and through the routers (the other role's clients stay).
    Answers with the new read-write credentials."""
    rot = body or RotateIn()
    return lifecycle_route(
        platform,
        owner,
        project_id,
        idempotency_key,
        f"/v1/projects/{project_id}/rotate-password",
        rot,
        lambda: service.rotate_password(
            platform, owner, project_id, role=rot.role, overlap_s=rot.overlap_s
        ),
        wait=wait,
        credentials=True,
    )


@router.post(
    "/projects/{project_id}/pause",
    tags=["projects"],
    summary="Pause a project",
    response_model=ProjectWithOperation,
    responses={202: {"model": ProjectWithOperation}, **OPERATION_ERRORS},
)
def pause_project(
    project_id: str,
    platform: PlatformDep,
    owner: OwnerDep,
    wait: WaitQuery = True,
    idempotency_key: IdemHeader = None,
) -> JSONResponse:
    """Starts a `pause` operation: the project's roles may no longer log in,
    open sessions are ended, the SQL API answers 409. Data is untouched."""
    return lifecycle_route(
        platform,
        owner,
        project_id,
        idempotency_key,
        f"/v1/projects/{project_id}/pause",
        None,
        lambda: service.pause_project(platform, owner, project_id),
        wait=wait,
    )


@router.post(
    "/projects/{project_id}/resume",
    tags=["projects"],
    summary="Resume a paused project",
    response_model=ProjectWithOperation,
    responses={202: {"model": ProjectWithOperation}, **OPERATION_ERRORS},
)
def resume_project(
    project_id: str,
    platform: PlatformDep,
    owner: OwnerDep,
    wait: WaitQuery = True,
    idempotency_key: IdemHeader = None,
) -> JSONResponse:
    """Starts a `resume` operation: the project's roles may log in again."""
    return lifecycle_route(
        platform,
        owner,
        project_id,
        idempotency_key,
        f"/v1/projects/{project_id}/resume",
        None,
        lambda: service.resume_project(platform, owner, project_id),
        wait=wait,
    )


@router.post(
    "/projects/{project_id}/plan",
    tags=["projects"],
    summary="Change a project's plan",
    response_model=ProjectWithOperation,
    responses={202: {"model": ProjectWithOperation}, **OPERATION_ERRORS},
)
def change_plan(
    project_id: str,
    body: PlanIn,
    platform: PlatformDep,
    owner: OwnerDep,
    wait: WaitQuery = True,
    idempotency_key: IdemHeader = None,
) -> JSONResponse:
    """Starts a `change_plan` operation: applies the plan's connection limit
    and statement timeout to the project's roles and records the plan. The
    operation's `result.placement` says whether the placement policy would
    host the project elsewhere on this plan (moves come with region moves)."""
    return lifecycle_route(
        platform,
        owner,
        project_id,
        idempotency_key,
        f"/v1/projects/{project_id}/plan",
        body,
        lambda: service.change_plan(platform, owner, project_id, plan_type=body.plan),
        wait=wait,
    )


@router.get(
    "/projects/{project_id}/connection",
    tags=["projects"],
    summary="Connection details",
    responses={404: ERRORS[404], 422: ERRORS[422]},
)
def get_connection(
    project_id: str,
    platform: PlatformDep,
    owner: OwnerDep,
    mode: Annotated[
        Literal["rw", "ro"], Query(description="rw: read-write; ro: every transaction read-only")
    ] = "rw",
    pooling: Annotated[
        Literal["session", "transaction"],
        Query(
            description="The router's pooling: session (default; everything works) or "
            "transaction (a second port, for serverless clients; SET, LISTEN, temporary "
            "tables, session advisory locks and SQL PREPARE do not last beyond a transaction)"
        ),
    ] = "session",
    direct: Annotated[
        bool,
        Query(
            description="The server's own address instead of the router's, for tools that "
            "need it (pg_dump, replication); it changes if the project moves"
        ),
    ] = False,
    via: Annotated[
        str | None,
        Query(
            description="Another region's router (default: the router of the region that "
            "hosts the project); it forwards to the project's server, and `note` says so"
        ),
    ] = None,
) -> ConnectionOut:
    """The string a client connects with. By default it names the router of the
    region hosting the project (PgBouncer, TLS with `verify-full`), which stays the
    same when pgfleet later moves the project; `direct=true` names the server."""
    return conn_out(
        service.connection_details(
            platform, owner, project_id, mode, pooling=pooling, direct=direct, via=via
        )
    )


@router.get(
    "/projects/{project_id}/usage",
    tags=["projects"],
    summary="A project's database size and open connections",
    responses={404: ERRORS[404]},
)
def project_usage(project_id: str, platform: PlatformDep, owner: OwnerDep) -> UsageOut:
    """Read on the project's server now (null values when it does not answer),
    with the connection limit of its plan."""
    u = service.project_usage(platform, owner, project_id)
    return UsageOut(
        database_bytes=u.database_bytes,
        connections=u.connections,
        connection_limit=u.connection_limit,
        reachable=u.reachable,
    )
