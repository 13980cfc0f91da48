"""What the route modules share: the documented error answers, the query
and header parameters every operation route takes, and the answer a
started operation gets."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header, Query
from fastapi.responses import JSONResponse

from pgfleet.api.idempotency import run_idempotent
from pgfleet.api.schemas import (
    AuditEntry,
    ConnectionOut,
    ErrorResponse,
    OperationOut,
    ProjectCreated,
    ProjectOut,
    ProjectWithOperation,
)
from pgfleet.operations.store import get_operation
from pgfleet.tenants import service
from pgfleet.tenants.service import ConnectionDetails

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


WaitQuery = Annotated[
    bool,
    Query(
        description="Wait for the operation to end (up to PGFLEET_OPERATION_WAIT_S); "
        "false answers 202 at once with the operation to poll."
    ),
]
WaitForRegionQuery = Annotated[
    bool,
    Query(
        description="When the region's server failed its last health check: false "
        "(default) answers 503 at once; true queues the new project, and its operation "
        "retries until the server is back (or its deadline passes). Without it, a "
        "server that goes down while the new project is being made is given up on "
        "after about 10 s."
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


def project_and_op(
    platform: Any, owner: Any, op_id: Any, *, wait: bool, credentials: bool = False
) -> tuple[int, ProjectWithOperation]:
    """(status, body) after an operation was started: 200 when it finished,
    202 while it runs, its error if it failed."""
    if wait:
        op = service.wait_or_raise(platform, op_id)
    else:
        with platform.db.connection() as conn:
            op = get_operation(conn, op_id)
    assert op.tenant_id is not None, "a project's operation names its project"
    project = service.get_project(platform, owner, op.tenant_id, include_deleted=True)
    shown = None
    # Credentials are shown for an active project (a paused one's cannot log in).
    if credentials and op.status == "finished" and project.status == "active":
        shown = conn_out(
            service.connection_details(platform, owner, project.id, "rw", project=project)
        )
    body = ProjectWithOperation(
        project=ProjectOut.from_row(project),
        operation=OperationOut.from_row(op),
        connection=shown,
    )
    return (200 if op.status == "finished" else 202), body


def created(status: int, out: ProjectWithOperation) -> tuple[int, ProjectCreated]:
    """The answer to a request that makes a project (create, restore): one
    body for 201 and 202, the project's own fields plus `connection` (null
    until it is ready) and `operation`, so a client reads it one way."""
    done = status == 200 and out.connection is not None
    body = ProjectCreated(
        **out.project.model_dump(),
        connection=out.connection if done else None,
        operation=out.operation,
    )
    return (201 if done else 202), body


def lifecycle_route(
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
        return project_and_op(platform, owner, op_id, wait=wait, credentials=credentials)

    return run_idempotent(
        platform,
        owner,
        key,
        method="POST",
        path=path,
        body={"body": body, "wait": wait},
        produce=produce,
    )


def conn_out(c: ConnectionDetails) -> ConnectionOut:
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
        pooling=c.pooling,
        direct=c.direct,
        router_region=c.router_region,
        note=c.note,
    )


def audit_out(r: dict[str, Any]) -> AuditEntry:
    return AuditEntry(**{k: v for k, v in r.items() if k != "tenant_id"}, project_id=r["tenant_id"])
