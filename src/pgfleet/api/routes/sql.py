"""The SQL API route (the fast path in api/sqlpath.py serves most calls before it)."""

from __future__ import annotations

from typing import Annotated

from anyio import from_thread
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials

from pgfleet.api.deps import PlatformDep, bearer
from pgfleet.api.idempotency import run_idempotent
from pgfleet.api.routes.common import (
    ERRORS,
    IdemHeader,
)
from pgfleet.api.schemas import (
    ErrorResponse,
    SqlIn,
    SqlOut,
)
from pgfleet.api.sqlpath import sql_body, sql_request
from pgfleet.tenants.sql import SqlGateway

router = APIRouter()


@router.post(
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
