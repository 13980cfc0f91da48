"""/health, /ca.crt and /metrics: what needs no (or an admin) token outside /v1."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from pgfleet.api.deps import AdminDep, PlatformDep
from pgfleet.api.routes.common import (
    COMMON,
    json_errors,
)
from pgfleet.backups.service import add_backup_health
from pgfleet.errors import NotFound
from pgfleet.monitoring.health import fleet_health

router = APIRouter()


@router.get(
    "/health",
    tags=["health"],
    summary="Platform DB and regional servers",
    responses={**COMMON, 503: {"description": "The platform database cannot be reached."}},
)
def health(platform: PlatformDep) -> JSONResponse:
    """`ok` when everything answers; `degraded` when a regional server is down,
    cannot archive its WAL, or its newest base backup is older than its
    schedule (its region shows `degraded`, the rest keep working); 503 `down`
    when the platform DB cannot be reached. Each server shows its WAL
    archiving and newest base backup. Needs no token."""
    body = add_backup_health(platform, fleet_health(platform))
    return JSONResponse(body, status_code=503 if body["status"] == "down" else 200)


@router.get(
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


@router.get(
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
