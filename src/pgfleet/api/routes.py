"""The /v1 routes and /health. Each parses, calls one service function, formats."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from anyio import from_thread
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials

from pgfleet import auth
from pgfleet.api.deps import AdminDep, OwnerDep, PlatformDep, bearer, known_query_parameters
from pgfleet.api.idempotency import run_idempotent
from pgfleet.api.schemas import (
    REGION_SCHEMA,
    WINDOW_PATTERN,
    AuditEntry,
    AuditList,
    ConnectionOut,
    ErrorResponse,
    OperationList,
    OperationOut,
    OwnerCreate,
    OwnerCreated,
    OwnerOut,
    OwnerRow,
    PlanIn,
    ProjectCreate,
    ProjectCreated,
    ProjectList,
    ProjectOut,
    ProjectWithOperation,
    ReconcileIn,
    RegionOut,
    RotateIn,
    ServerOut,
    SqlIn,
    SqlOut,
    TokenCreate,
    TokenCreated,
    TokenOut,
)
from pgfleet.api.sqlpath import sql_body, sql_request
from pgfleet.errors import NotFound
from pgfleet.fleet.health import fleet_health
from pgfleet.monitoring import stats
from pgfleet.monitoring.service import advisor_report, cost_report
from pgfleet.operations import service as ops_service
from pgfleet.operations.reconcile import last_run, reconcile
from pgfleet.operations.store import audit, get_operation, list_audit
from pgfleet.regions import REGIONS
from pgfleet.tenants import service
from pgfleet.tenants.service import ConnectionDetails
from pgfleet.tenants.sql import SqlGateway

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing, invalid or revoked token."},
    403: {"model": ErrorResponse, "description": "This token may not do that (admins only)."},
    404: {"model": ErrorResponse, "description": "Not found (or not yours)."},
    422: {
        "model": ErrorResponse,
        "description": "Invalid input (an unknown parameter or field among it); the message "
        "says what is allowed.",
    },
    429: {
        "model": ErrorResponse,
        "description": "Over a rate limit (Retry-After says when to retry), or too many "
        "failed authentications from this address.",
    },
    503: {
        "model": ErrorResponse,
        "description": "The platform database (`platform_unavailable`) or a region's server "
        "(`region_unavailable`) cannot be reached; retry shortly.",
    },
}
# Error answers of routes whose own answer is not JSON (FastAPI would
# document them in the route's media type).
JSON_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def json_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"description": ERRORS[c]["description"], "content": JSON_ERROR} for c in codes}


# Every route can answer these.
COMMON: dict[int | str, dict[str, Any]] = {k: ERRORS[k] for k in (422, 429, 503)}

health_router = APIRouter(dependencies=[Depends(known_query_parameters)])
v1 = APIRouter(
    prefix="/v1",
    responses={401: ERRORS[401], **COMMON},
    dependencies=[Depends(known_query_parameters)],
)


@health_router.get(
    "/health",
    tags=["health"],
    summary="Platform DB and regional servers",
    responses={**COMMON, 503: {"description": "The platform database cannot be reached."}},
)
def health(platform: PlatformDep) -> JSONResponse:
    """`ok` when everything answers; `degraded` when a regional server is down
    (its region shows `degraded`, the rest keep working); 503 `down` when the
    platform DB cannot be reached. Needs no token."""
    body = fleet_health(platform)
    return JSONResponse(body, status_code=503 if body["status"] == "down" else 200)


@health_router.get(
    "/ca.crt",
    tags=["health"],
    summary="The CA that signed the database servers' certificates",
    response_class=PlainTextResponse,
    responses={
        200: {"content": {"application/x-pem-file": {}}},
        **json_errors(404, 422, 429, 503),
    },
)
def ca_certificate(platform: PlatformDep) -> PlainTextResponse:
    """PEM. Connection strings carry `sslmode=verify-full&sslrootcert=<path>`
    with the path on the pgfleet host; elsewhere, save this file and point
    `sslrootcert` at it. Needs no token: a CA certificate is public."""
    pem = platform.ca_bundle()
    if not pem:
        raise NotFound("no CA is configured for the servers (see sslrootcert in pgfleet.toml)")
    return PlainTextResponse(pem, media_type="application/x-pem-file")


@v1.get("/regions", tags=["regions"], summary="The region catalog")
def list_regions(platform: PlatformDep, owner: OwnerDep) -> list[RegionOut]:
    """All six regions; `active` ones have servers, `metadata-only` ones are
    selectable and hosted in the default region until they get one."""
    counts: dict[str, int] = {}
    for s in platform.servers.all(enabled_only=True):
        counts[s.region] = counts.get(s.region, 0) + 1
    return [
        RegionOut(
            id=r.id,
            name=r.name,
            flag=r.flag,
            status="active" if counts.get(r.id) else "metadata-only",
            server_count=counts.get(r.id, 0),
            default=r.id == platform.settings.default_region,
        )
        for r in REGIONS
    ]


WaitQuery = Annotated[
    bool,
    Query(
        description="Wait for the operation to end (up to PGFLEET_OPERATION_WAIT_S); "
        "false answers 202 at once with the operation to poll."
    ),
]
IdemHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Repeat a POST safely: the same key and request return the first "
        "result and create nothing new (1-255 visible ASCII characters).",
        json_schema_extra={"minLength": 1, "maxLength": 255, "pattern": r"^[!-~]+$"},
    ),
]
OPERATION_ERRORS: dict[int | str, dict[str, Any]] = {
    404: ERRORS[404],
    409: {
        "model": ErrorResponse,
        "description": "The project is not in a state that allows this, or another "
        "operation is running on it (the message names it).",
    },
    422: ERRORS[422],
}


def _op_out(platform: Any, op_id: Any) -> OperationOut:
    with platform.db.connection() as conn:
        return OperationOut.from_row(get_operation(conn, op_id))


def _project_and_op(
    platform: Any, owner: Any, op_id: Any, *, wait: bool, credentials: bool = False
) -> tuple[int, ProjectWithOperation]:
    """(status, body) after an operation was started: 200 when it finished,
    202 while it runs, its error if it failed."""
    if wait:
        op = service.wait_or_raise(platform, op_id)
    else:
        with platform.db.connection() as conn:
            op = get_operation(conn, op_id)
    project = service.get_project(platform, owner, op["tenant_id"], include_deleted=True)
    conn_out = None
    # Credentials are shown for an active project (a paused one's cannot log in).
    if credentials and op["status"] == "finished" and project["status"] == "active":
        conn_out = _conn_out(service.connection_details(platform, owner, project["id"], "rw"))
    body = ProjectWithOperation(
        project=ProjectOut.from_row(project),
        operation=OperationOut.from_row(op),
        connection=conn_out,
    )
    return (200 if op["status"] == "finished" else 202), body


@v1.post(
    "/projects",
    tags=["projects"],
    status_code=201,
    summary="Create a project",
    response_model=ProjectCreated,
    responses={
        202: {"model": ProjectWithOperation, "description": "Provisioning is still running."},
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
            plan_type=body.plan_type,
            subdomain=body.subdomain,
        )
        status, out = _project_and_op(platform, owner, op_id, wait=wait, credentials=True)
        if status != 200 or out.connection is None:
            return 202, out
        created = ProjectCreated(
            **out.project.model_dump(), connection=out.connection, operation=out.operation
        )
        return 201, created

    return run_idempotent(
        platform,
        owner,
        idempotency_key,
        method="POST",
        path="/v1/projects",
        body={"body": body, "wait": wait},
        produce=produce,
    )


@v1.get("/projects", tags=["projects"], summary="List your projects")
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


@v1.get(
    "/projects/{project_id}",
    tags=["projects"],
    summary="Show a project",
    responses={404: ERRORS[404]},
)
def get_project(project_id: str, platform: PlatformDep, owner: OwnerDep) -> ProjectOut:
    return ProjectOut.from_row(service.get_project(platform, owner, project_id))


@v1.delete(
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
    status, out = _project_and_op(platform, owner, op_id, wait=wait)
    return JSONResponse(jsonable_encoder(out), status_code=status)


def _lifecycle_route(
    platform: Any,
    owner: Any,
    project_id: str,
    key: str | None,
    path: str,
    body: Any,
    start: Any,
    *,
    wait: bool,
    credentials: bool = False,
) -> JSONResponse:
    def produce() -> tuple[int, Any]:
        op_id = start()
        return _project_and_op(platform, owner, op_id, wait=wait, credentials=credentials)

    return run_idempotent(
        platform,
        owner,
        key,
        method="POST",
        path=path,
        body={"body": body, "wait": wait},
        produce=produce,
    )


@v1.post(
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
    `overlap_s`, when that window ends (an `expire_credentials` operation);
    sessions already open are left alone. Answers with the new read-write
    credentials."""
    rot = body or RotateIn()
    return _lifecycle_route(
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


@v1.post(
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
    return _lifecycle_route(
        platform,
        owner,
        project_id,
        idempotency_key,
        f"/v1/projects/{project_id}/pause",
        None,
        lambda: service.pause_project(platform, owner, project_id),
        wait=wait,
    )


@v1.post(
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
    return _lifecycle_route(
        platform,
        owner,
        project_id,
        idempotency_key,
        f"/v1/projects/{project_id}/resume",
        None,
        lambda: service.resume_project(platform, owner, project_id),
        wait=wait,
    )


@v1.post(
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
    return _lifecycle_route(
        platform,
        owner,
        project_id,
        idempotency_key,
        f"/v1/projects/{project_id}/plan",
        body,
        lambda: service.change_plan(platform, owner, project_id, plan_type=body.plan),
        wait=wait,
    )


@v1.get(
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
    rows = ops_service.project_operations(platform, project["id"], limit=limit)
    return OperationList(operations=[OperationOut.from_row(r) for r in rows])


@v1.get(
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
        rows = list_audit(conn, tenant_id=project["id"], limit=limit)
    return AuditList(entries=[_audit_out(r) for r in rows])


def _audit_out(r: dict[str, Any]) -> AuditEntry:
    return AuditEntry(**{k: v for k, v in r.items() if k != "tenant_id"}, project_id=r["tenant_id"])


@v1.get(
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


@v1.get(
    "/operations/{operation_id}",
    tags=["operations"],
    summary="One operation with its steps",
    responses={404: ERRORS[404]},
)
def get_operation_route(operation_id: str, platform: PlatformDep, owner: OwnerDep) -> OperationOut:
    return OperationOut.from_row(ops_service.visible_operation(platform, owner, operation_id))


@v1.post(
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
        return (200 if op["status"] == "cancelled" else 202), OperationOut.from_row(op)

    return run_idempotent(
        platform,
        owner,
        idempotency_key,
        method="POST",
        path=f"/v1/operations/{operation_id}/cancel",
        body=None,
        produce=produce,
    )


@v1.get(
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
) -> ConnectionOut:
    return _conn_out(service.connection_details(platform, owner, project_id, mode))


@v1.post(
    "/projects/{project_id}/sql",
    tags=["sql"],
    summary="Run one SQL statement",
    response_model=SqlOut,
    responses={
        400: {
            "model": ErrorResponse,
            "description": "The statement failed: SQLSTATE, message and position are in the error.",
        },
        404: ERRORS[404],
        409: {"model": ErrorResponse, "description": "The project is not active."},
        413: {"description": "The body is over 4 MiB."},
        422: ERRORS[422],
        429: {
            "model": ErrorResponse,
            "description": "All of the project's SQL API connections in this API process are "
            "busy (`too_many_statements`, with the `limit`); retry shortly.",
        },
        503: {
            "model": ErrorResponse,
            "description": "The project's server is down (`region_unavailable`, naming the "
            "region) or the platform database is (`platform_unavailable`).",
        },
    },
)
async def sql(
    request: Request,
    project_id: str,
    body: SqlIn,
    platform: PlatformDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    idempotency_key: IdemHeader = None,
) -> JSONResponse:
    """Runs the statement on the project's server logged in as the project's
    own role (`ro`: its read-only role), with pgfleet-enforced timeout (a
    statement that ignores its cancel has its session ended) and result caps
    (a read stops at them; a write runs to its end and `row_count` counts
    every row). Every call writes a query log row."""
    # Requests without an Idempotency-Key are served by api.sqlpath.SqlFastPath
    # before they reach this route; its code and this one share everything.
    gateway: SqlGateway = request.app.state.sql
    token = creds.credentials if creds else None
    req = sql_request(body)
    if idempotency_key is not None:
        # A repeated statement (an INSERT sent twice by a retrying client)
        # answers from the first run instead of running again.
        def keyed() -> JSONResponse:
            owner, row = from_thread.run(gateway.authenticate, token, project_id)
            return run_idempotent(
                platform,
                owner,
                idempotency_key,
                method="POST",
                path=f"/v1/projects/{project_id}/sql",
                body=body,
                produce=lambda: (
                    200,
                    sql_body(from_thread.run(gateway.run, owner, project_id, req, row)),
                ),
            )

        return await run_in_threadpool(keyed)
    owner, row = await gateway.authenticate(token, project_id)
    return JSONResponse(sql_body(await gateway.run(owner, project_id, req, row)))


def _conn_out(c: ConnectionDetails) -> ConnectionOut:
    return ConnectionOut(
        mode=c.mode,
        host=c.host,
        port=c.port,
        database=c.database,
        user=c.user,
        password=c.password,
        sslmode=c.sslmode,
        sslrootcert=c.sslrootcert,
        uri=c.uri,
        region=c.region,
        hosted_region=c.hosted_region,
    )


@v1.get("/me", tags=["auth"], summary="Who this token belongs to")
def me(owner: OwnerDep) -> OwnerOut:
    return OwnerOut(id=owner.id, name=owner.name, is_admin=owner.is_admin)


@v1.post(
    "/tokens",
    tags=["auth"],
    status_code=201,
    summary="Create an API token",
    response_model=TokenCreated,
)
def create_token(
    body: TokenCreate, platform: PlatformDep, owner: OwnerDep, idempotency_key: IdemHeader = None
) -> JSONResponse:
    def produce() -> tuple[int, Any]:
        tid, token = auth.create_token(platform, owner, body.name)
        return 201, TokenCreated(id=tid, name=body.name, token=token)

    return run_idempotent(
        platform,
        owner,
        idempotency_key,
        method="POST",
        path="/v1/tokens",
        body=body,
        produce=produce,
    )


@v1.get("/tokens", tags=["auth"], summary="Your API tokens (never the secrets)")
def list_tokens(platform: PlatformDep, owner: OwnerDep) -> list[TokenOut]:
    return [TokenOut(**r) for r in auth.list_tokens(platform, owner)]


@v1.delete(
    "/tokens/{token_id}",
    tags=["auth"],
    status_code=204,
    summary="Revoke a token",
    responses={404: ERRORS[404]},
)
def revoke_token(token_id: str, platform: PlatformDep, owner: OwnerDep) -> Response:
    auth.revoke_token(platform, owner, token_id)
    return Response(status_code=204)


@v1.post(
    "/admin/owners",
    tags=["admin"],
    status_code=201,
    summary="Create an owner",
    response_model=OwnerCreated,
)
def create_owner(
    body: OwnerCreate, platform: PlatformDep, admin: AdminDep, idempotency_key: IdemHeader = None
) -> JSONResponse:
    """Creates an owner (a person or team) and its first token, shown once."""

    def produce() -> tuple[int, Any]:
        owner, token = auth.create_owner(platform, body.name, is_admin=body.is_admin)
        return 201, OwnerCreated(
            owner=OwnerOut(id=owner.id, name=owner.name, is_admin=owner.is_admin), token=token
        )

    return run_idempotent(
        platform,
        admin,
        idempotency_key,
        method="POST",
        path="/v1/admin/owners",
        body=body,
        produce=produce,
    )


@v1.get("/admin/owners", tags=["admin"], summary="All owners")
def list_owners(platform: PlatformDep, admin: AdminDep) -> list[OwnerRow]:
    return [OwnerRow(**r) for r in auth.list_owners(platform)]


@v1.get("/admin/servers", tags=["admin"], summary="Registered regional servers")
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


WindowQ = Annotated[
    str,
    Query(
        description="How far back: a number and m, h or d (e.g. 30m, 24h, 7d; max 31d).",
        json_schema_extra={"pattern": WINDOW_PATTERN},
    ),
]


@v1.get(
    "/projects/{project_id}/stats",
    tags=["monitoring"],
    summary="A project's query stats",
    responses={404: ERRORS[404], 422: ERRORS[422]},
)
def project_stats(
    project_id: str, platform: PlatformDep, owner: OwnerDep, window: WindowQ = "24h"
) -> dict[str, Any]:
    """Per route (rw/ro): query count, error rate, avg/p50/p95/p99 in ms, and
    the statements that took the most time (as fingerprints, never values)."""
    project = service.get_project(platform, owner, project_id)
    return {
        "project_id": str(project["id"]),
        **stats.project_performance(platform, project["id"], window),
    }


@v1.get("/admin/stats/regions", tags=["monitoring"], summary="Where tenants live")
def stats_regions(platform: PlatformDep, admin: AdminDep) -> dict[str, Any]:
    """Per region: tenants (free/paid; active/paused/failed), share of all,
    how many asked for it but live elsewhere, servers with their last health
    check, databases and bytes hosted."""
    return stats.region_stats(platform)


@v1.get(
    "/admin/stats/performance",
    tags=["monitoring"],
    summary="How each region performs",
    responses={422: ERRORS[422]},
)
def stats_performance(
    platform: PlatformDep,
    admin: AdminDep,
    window: WindowQ = "24h",
    by: Annotated[
        Literal["region", "hosted_region"],
        Query(
            description="Group by the requested region (like the seed's query) or the hosting one"
        ),
    ] = "region",
) -> dict[str, Any]:
    """Per region and route: query count, error rate, avg, p50, p95, p99 (ms).
    `exact` is false when percentiles come from per-minute histograms (large
    windows), which are within 25% of the exact value."""
    return stats.performance(platform, window, by=by)


@v1.get("/admin/advisor", tags=["monitoring"], summary="Expansion advisor")
def advisor(platform: PlatformDep, admin: AdminDep) -> dict[str, Any]:
    """The seed's rule: when at least `min_sample` projects exist and a share of
    `share_threshold` or more picked one non-default region without a server,
    deploy one there; also any region whose servers are near capacity. Each
    recommendation says why, with the numbers."""
    return advisor_report(platform)


@v1.get("/admin/costs", tags=["monitoring"], summary="Monthly cost estimate")
def costs(platform: PlatformDep, admin: AdminDep) -> dict[str, Any]:
    """Monthly cost per region and per tenant from the configured server price
    (the seed's ~40 EUR per server by default), and the seed's expansion
    options side by side: current fleet, 3 servers, hybrid, full cloud."""
    return cost_report(platform)


@health_router.get(
    "/metrics",
    responses=json_errors(401, 403, 422, 429, 503),
    tags=["monitoring"],
    summary="Prometheus metrics (admin token)",
    response_class=PlainTextResponse,
)
def metrics(platform: PlatformDep, admin: AdminDep) -> PlainTextResponse:
    """Request counts and latencies, provisioning counts and durations, query
    counts and durations per region and route, server health gauges, pool
    sizes. Needs an admin bearer token."""
    return PlainTextResponse(
        platform.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )


@v1.get("/admin/audit", tags=["admin"], summary="The audit log across all projects")
def admin_audit(
    platform: PlatformDep, admin: AdminDep, limit: Annotated[int, Query(ge=1, le=5000)] = 200
) -> AuditList:
    with platform.db.connection() as conn:
        rows = list_audit(conn, limit=limit)
    return AuditList(entries=[_audit_out(r) for r in rows])


@v1.post("/admin/reconcile", tags=["admin"], summary="Compare the platform DB with the servers")
def admin_reconcile(
    platform: PlatformDep,
    admin: AdminDep,
    body: ReconcileIn | None = None,
    idempotency_key: IdemHeader = None,
) -> JSONResponse:
    """Reports orphan tenant databases and roles, projects whose database,
    roles, owner, grants or login state are wrong, and projects stuck
    provisioning. With `repair`, fixes them; an orphan database that holds
    data is dropped only with `force` as well. Projects with an operation in
    flight are left to their worker."""
    req = body or ReconcileIn()

    def produce() -> tuple[int, Any]:
        with platform.db.connection() as conn:
            audit(
                conn,
                actor=ops_service.actor_of(admin),
                owner_id=admin.id,
                action="fleet.reconcile",
                details={"repair": req.repair, "force": req.force},
            )
        return 200, reconcile(
            platform, repair=req.repair, force=req.force, actor=ops_service.actor_of(admin)
        )

    return run_idempotent(
        platform,
        admin,
        idempotency_key,
        method="POST",
        path="/v1/admin/reconcile",
        body=req,
        produce=produce,
    )


@v1.get(
    "/admin/reconcile",
    tags=["admin"],
    summary="The last reconciler run",
    responses={404: {"model": ErrorResponse, "description": "The reconciler has not run yet."}},
)
def admin_last_reconcile(platform: PlatformDep, admin: AdminDep) -> dict[str, Any]:
    run = last_run(platform)
    if run is None:
        raise NotFound("the reconciler has not run yet")
    return run
