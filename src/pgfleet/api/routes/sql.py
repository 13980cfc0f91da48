"""The SQL API route, and the HTTP driver's (the fast path in api/sqlpath.py
serves most calls before them, with the same code)."""

from __future__ import annotations

from typing import Annotated

from anyio import from_thread
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
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
from pgfleet.api.sqlpath import serve_driver, sql_body, sql_request
from pgfleet.errors import read_only_refusal
from pgfleet.tenants.sql import SqlGateway

router = APIRouter()
# Outside /v1: the path the Neon serverless driver posts to.
driver_router = APIRouter()


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
            if owner.read_only and req.mode != "ro":
                # Before the replay: a key is the owner's, not the token's.
                raise read_only_refusal("SQL runs with mode ro only")
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


_DRIVER_BODY = {
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["query"],
                        "properties": {
                            "query": {"type": "string"},
                            "params": {"type": "array", "items": {"type": ["string", "null"]}},
                        },
                    },
                    {
                        "type": "object",
                        "required": ["queries"],
                        "properties": {
                            "queries": {
                                "type": "array",
                                "maxItems": 100,
                                "items": {"type": "object", "required": ["query"]},
                            }
                        },
                    },
                ]
            }
        }
    },
    "required": True,
}


@driver_router.post(
    "/sql",
    tags=["sql"],
    summary="Serverless driver endpoint (the Neon HTTP protocol)",
    openapi_extra={
        "requestBody": _DRIVER_BODY,
        "parameters": [
            {
                "name": "Neon-Connection-String",
                "in": "header",
                "required": True,
                "description": "The project's connection string (rw or ro credentials); "
                "its database names the project.",
                "schema": {"type": "string"},
            },
            *(
                {"name": name, "in": "header", "required": False, "schema": {"type": "string"}}
                for name in (
                    "Neon-Batch-Isolation-Level",
                    "Neon-Batch-Read-Only",
                    "Neon-Batch-Deferrable",
                    "Neon-Array-Mode",
                    "Neon-Raw-Text-Output",
                )
            ),
        ],
    },
    responses={
        200: {
            "description": "`{fields, rows, command, rowCount, rowAsArray}`, or "
            "`{results: [...]}` for a transaction; values are PostgreSQL's text.",
        },
        400: {
            "description": "The statement, the transaction or the login failed: `message` "
            "and PostgreSQL's fields (`code`, `detail`, `hint`, `position`, ...), which the "
            "driver turns into its NeonDbError. A failed login is always 28P01.",
        },
        413: {"description": "The body is over 4 MiB."},
        429: {"description": "Over the rate limit, or too many failed logins."},
        503: {"model": ErrorResponse, "description": "The project's server is down."},
    },
)
async def driver_sql(request: Request) -> Response:
    """What `@neondatabase/serverless`'s `neon()` and `transaction()` post, so
    an edge or serverless app uses that driver against pgfleet by pointing
    `neonConfig.fetchEndpoint` here. The password is checked as PostgreSQL
    checks it; statements run as the project's own role with the SQL API's
    timeout, caps and query log (a result over the caps is an error here
    and changes nothing; a transaction's statements share the timeout and
    the byte cap). See the README's "Serverless and edge apps"."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    client = request.client.host if request.client else "unknown"
    status, payload, extra = await serve_driver(
        request.app.state, headers, await request.body(), client
    )
    return Response(payload, status_code=status, media_type="application/json", headers=extra)
