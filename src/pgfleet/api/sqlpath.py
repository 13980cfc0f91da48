"""POST /v1/projects/{id}/sql and POST /sql (the HTTP protocol of the Neon
serverless driver): the request and answer shapes, and the fast path that
serves them.

The SQL API is the one endpoint called at thousands of requests a second, so
`SqlFastPath` (plain ASGI, inside the app's error and metrics middleware)
serves it without FastAPI's routing and dependency resolution, which cost
about as much CPU as the statement itself. It uses the same body model,
the same gateway and the same error shape as the documented route; whatever
it does not handle itself (an Idempotency-Key, a body that does not
validate, a non-JSON content type) goes on to that route unchanged, so
FastAPI still answers those exactly as documented.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from types import SimpleNamespace
from typing import Any

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgfleet.api.schemas import SqlIn
from pgfleet.errors import BodyTooLarge, PgfleetError, RateLimited, to_http
from pgfleet.tenants.sql import SqlGateway, SqlRequest, SqlResult
from pgfleet.tenants.sql.driver import DriverError, parse_call
from pgfleet.tenants.sql.driver_runner import serve

DRIVER_ROUTE = "/sql"
_DRIVER_LABEL = SimpleNamespace(path=DRIVER_ROUTE)

SQL_ROUTE = "/v1/projects/{project_id}/sql"
_SQL_PATH = re.compile(r"/v1/projects/([^/]+)/sql")
# The largest legitimate body is a SQL call: 100,000 characters and 1,000
# params. Anything bigger is refused (413) before it is all read.
MAX_BODY_BYTES = 4 * 1024 * 1024
_ROUTE_LABEL = SimpleNamespace(path=SQL_ROUTE)
_ENCODE_INLINE_BYTES = 256 * 1024


def sql_request(body: SqlIn) -> SqlRequest:
    return SqlRequest(
        query=body.query,
        params=body.params,
        mode=body.mode,
        timeout_ms=body.timeout_ms,
        max_rows=body.max_rows,
    )


def sql_body(r: SqlResult) -> dict[str, Any]:
    """The answer; rows are already JSON values, so nothing re-validates them."""
    return {
        "columns": r.columns,
        "rows": r.rows,
        "row_count": r.row_count,
        "truncated": r.truncated,
        "duration_ms": r.duration_ms,
        "command": r.command,
        "mode": r.mode,
        "limits": r.limits,
    }


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer ...` header, as HTTPBearer reads it."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token.strip()


async def serve_driver(
    state: Any, headers: dict[str, str], raw: bytes, address: str
) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) of a POST /sql: 200 with the driver's result,
    400 with PostgreSQL's error fields (what the driver turns into its
    NeonDbError), or another status with pgfleet's error envelope (a region
    down: 503). Failed logins are counted per address and database: past
    the limit, that database's logins from that address get 429 for a while
    (another project's app behind the same address is not held up)."""
    gateway: SqlGateway = state.sql
    limits = getattr(state, "limits", None)
    size = 0
    extra: dict[str, str] = {}
    failures = ""
    try:
        call = parse_call(headers, raw)
        failures = f"{address}|{call.credentials.database}"
        if limits is not None and (wait := limits.auth_failures.peek(failures)) > 0:
            raise RateLimited(
                f"too many failed logins to {call.credentials.database} from {address}; "
                f"try again in {math.ceil(wait)} s",
                retry_after_s=max(1, math.ceil(wait)),
            )
        content, size = await serve(gateway, call)
        status = 200
    except DriverError as e:
        status, content = e.status, e.body()
        if e.fields.get("code") == "28P01" and limits is not None and failures:
            limits.auth_failures.take(failures)
    except PgfleetError as exc:
        status, content, extra = to_http(exc)
        if status == 400:  # only a 400 is read as an error body by the driver
            content = DriverError(exc.message, code=exc.code).body()
    # A large answer is encoded in a thread, not on the event loop.
    if size > _ENCODE_INLINE_BYTES:
        return status, await asyncio.to_thread(_encode, content), extra
    return status, _encode(content), extra


class SqlFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if scope["path"] == DRIVER_ROUTE:
            await self._driver(scope, receive, send)
            return
        m = _SQL_PATH.fullmatch(scope["path"])
        if m is None:
            await self.app(scope, receive, send)
            return
        authorization = content_type = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"idempotency-key":
                await self.app(scope, receive, send)
                return
        raw = await _read_body(receive, send)
        if raw is None:
            return
        body: SqlIn | None = None
        if content_type is not None and content_type.split(";")[0].strip() == "application/json":
            try:
                body = SqlIn.model_validate(json.loads(raw))
            except (ValueError, RecursionError, ValidationError):
                body = None  # the route answers with its own 422
        if body is None:
            await self.app(scope, _replay(raw, receive), send)
            return
        scope["route"] = _ROUTE_LABEL  # the metrics label it like the route
        gateway: SqlGateway = scope["app"].state.sql
        big = False
        headers: dict[str, str] = {}
        try:
            owner, row = await gateway.authenticate(bearer_token(authorization), m.group(1))
            result = await gateway.run(owner, m.group(1), sql_request(body), row)
            status, content = 200, sql_body(result)
            big = result.approx_bytes > _ENCODE_INLINE_BYTES
        except PgfleetError as exc:
            status, content, headers = to_http(exc)
        # A large answer is encoded in a thread, not on the event loop.
        payload = await asyncio.to_thread(_encode, content) if big else _encode(content)
        await _send_payload(send, status, payload, headers)

    async def _driver(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await _read_body(receive, send)
        if raw is None:
            return
        scope["route"] = _DRIVER_LABEL
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        client = scope.get("client")
        status, payload, extra = await serve_driver(
            scope["app"].state, headers, raw, client[0] if client else "unknown"
        )
        await _send_payload(send, status, payload, extra)


async def _read_body(receive: Receive, send: Send) -> bytes | None:
    """The whole body, or None when the client went away or it was too
    large (then refused with 413 here)."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY_BYTES:
            status, refusal, _ = to_http(BodyTooLarge())
            await _send_json(send, status, refusal)
            return None
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_json(send: Send, status: int, content: dict[str, Any]) -> None:
    await _send_payload(send, status, _encode(content))


async def _send_payload(
    send: Send, status: int, payload: bytes, headers: dict[str, str] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _encode(content: dict[str, Any]) -> bytes:
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _replay(raw: bytes, receive: Receive) -> Receive:
    """The body already read, then the connection's own messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replay
