"""The /v1 routes and /health. Each parses, calls one service function, formats."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials

from pgfleet import auth
from pgfleet.api.deps import AdminDep, OwnerDep, PlatformDep, bearer
from pgfleet.api.schemas import (
    ConnectionOut,
    ErrorResponse,
    OwnerCreate,
    OwnerCreated,
    OwnerOut,
    OwnerRow,
    ProjectCreate,
    ProjectCreated,
    ProjectList,
    ProjectOut,
    RegionOut,
    ServerOut,
    SqlIn,
    SqlOut,
    TokenCreate,
    TokenCreated,
    TokenOut,
)
from pgfleet.fleet.health import fleet_health
from pgfleet.monitoring import stats
from pgfleet.monitoring.service import advisor_report, cost_report
from pgfleet.regions import REGIONS
from pgfleet.tenants import service
from pgfleet.tenants.service import ConnectionDetails
from pgfleet.tenants.sql import SqlRequest, SqlResult, run_sql

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing, invalid or revoked token."},
    404: {"model": ErrorResponse, "description": "Not found (or not yours)."},
    422: {
        "model": ErrorResponse,
        "description": "Invalid input; the message says what is allowed.",
    },
}

health_router = APIRouter()
v1 = APIRouter(prefix="/v1", responses={401: ERRORS[401]})


@health_router.get("/health", tags=["health"], summary="Platform DB and regional servers")
def health(platform: PlatformDep) -> JSONResponse:
    """`ok` when everything answers; `degraded` when a regional server is down
    (its region shows `degraded`, the rest keep working); 503 `down` when the
    platform DB cannot be reached. Needs no token."""
    body = fleet_health(platform)
    return JSONResponse(body, status_code=503 if body["status"] == "down" else 200)


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


@v1.post(
    "/projects",
    tags=["projects"],
    status_code=201,
    summary="Create a project",
    responses={
        422: ERRORS[422],
        503: {"model": ErrorResponse, "description": "The region's server cannot be reached."},
    },
)
def create_project(body: ProjectCreate, platform: PlatformDep, owner: OwnerDep) -> ProjectCreated:
    """Creates the project and its database on a server of the placed region,
    and returns it with read-write credentials (the only time the password is
    part of a project response)."""
    row, db = service.create_project(
        platform,
        owner,
        name=body.name,
        region=body.region,
        plan_type=body.plan_type,
        subdomain=body.subdomain,
    )
    conn = ConnectionDetails(
        mode="rw",
        host=db.host,
        port=db.port,
        database=db.database,
        user=db.user,
        password=db.password,
        sslmode=db.sslmode,
        region=db.region,
        hosted_region=db.hosted_region,
    )
    return ProjectCreated(**ProjectOut.from_row(row).model_dump(), connection=_conn_out(conn))


@v1.get("/projects", tags=["projects"], summary="List your projects")
def list_projects(
    platform: PlatformDep,
    owner: OwnerDep,
    region: Annotated[
        str | None, Query(description="Only projects that asked for this region")
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
    responses={404: ERRORS[404]},
)
def delete_project(project_id: str, platform: PlatformDep, owner: OwnerDep) -> ProjectOut:
    """Drops the project's database and role on its server; the row stays with
    status `deleted` and its timestamps, without connection info."""
    return ProjectOut.from_row(service.delete_project(platform, owner, project_id))


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
        422: ERRORS[422],
        503: {"model": ErrorResponse, "description": "The project's server is down."},
    },
)
async def sql(
    project_id: str,
    body: SqlIn,
    platform: PlatformDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> JSONResponse:
    """Runs the statement on the project's server logged in as the project's
    own role (`ro`: its read-only role), with pgfleet-enforced timeout and
    result caps. Every call writes a query log row."""
    req = SqlRequest(
        query=body.query,
        params=body.params,
        mode=body.mode,
        timeout_ms=body.timeout_ms,
        max_rows=body.max_rows,
    )

    def work() -> SqlResult:
        # The hot path: token and project in one platform round trip, and
        # one thread hop for all the blocking work.
        owner, row = auth.authenticate_with_project(
            platform, creds.credentials if creds else None, project_id
        )
        return run_sql(platform, owner, project_id, req, project_row=row)

    r = await run_in_threadpool(work)
    # The hot path: rows are already JSON values, so skip re-validating them.
    return JSONResponse(
        {
            "columns": r.columns,
            "rows": r.rows,
            "row_count": r.row_count,
            "truncated": r.truncated,
            "duration_ms": r.duration_ms,
            "command": r.command,
            "mode": r.mode,
            "limits": r.limits,
        }
    )


def _conn_out(c: ConnectionDetails) -> ConnectionOut:
    return ConnectionOut(
        mode=c.mode,
        host=c.host,
        port=c.port,
        database=c.database,
        user=c.user,
        password=c.password,
        sslmode=c.sslmode,
        uri=c.uri,
        region=c.region,
        hosted_region=c.hosted_region,
    )


@v1.get("/me", tags=["auth"], summary="Who this token belongs to")
def me(owner: OwnerDep) -> OwnerOut:
    return OwnerOut(id=owner.id, name=owner.name, is_admin=owner.is_admin)


@v1.post("/tokens", tags=["auth"], status_code=201, summary="Create an API token")
def create_token(body: TokenCreate, platform: PlatformDep, owner: OwnerDep) -> TokenCreated:
    tid, token = auth.create_token(platform, owner, body.name)
    return TokenCreated(id=tid, name=body.name, token=token)


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


@v1.post("/admin/owners", tags=["admin"], status_code=201, summary="Create an owner")
def create_owner(body: OwnerCreate, platform: PlatformDep, admin: AdminDep) -> OwnerCreated:
    """Creates an owner (a person or team) and its first token, shown once."""
    owner, token = auth.create_owner(platform, body.name, is_admin=body.is_admin)
    return OwnerCreated(
        owner=OwnerOut(id=owner.id, name=owner.name, is_admin=owner.is_admin), token=token
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
            capacity=s.capacity,
            tenants=loads.get(s.id, 0),
            is_primary=s.is_primary,
            enabled=s.enabled,
            embedded=s.embedded,
        )
        for s in platform.servers.all()
    ]


WindowQ = Annotated[
    str, Query(description="How far back: a number and m, h or d (e.g. 30m, 24h, 7d; max 31d).")
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
