"""The FastAPI application; domain errors become HTTP responses here, and
only here."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgfleet import __version__, domains
from pgfleet.api.deps import known_query_parameters
from pgfleet.api.ratelimit import RateLimit, RateLimits
from pgfleet.api.routes import driver_router, health_router, v1
from pgfleet.api.routes.common import COMMON, ERRORS
from pgfleet.api.sqlpath import MAX_BODY_BYTES, SqlFastPath
from pgfleet.config import Settings, get_settings
from pgfleet.errors import BodyTooLarge, InternalError, PgfleetError, to_http
from pgfleet.monitoring.background import BackgroundLoop
from pgfleet.operations.runtime import OperationsRuntime
from pgfleet.operations.worker import quiet_outage_noise
from pgfleet.platform.core import Platform
from pgfleet.tenants.sql import SqlGateway
from pgfleet.web.routes import console_error_page, wants_page
from pgfleet.web.routes import install as install_console

log = logging.getLogger(__name__)

DESCRIPTION = """\
pgfleet runs PostgreSQL databases for projects in several regions.

Every `/v1` call needs `Authorization: Bearer pgf_...`. Errors have the shape
`{"error": {"code": ..., "message": ...}}`; the message says what was wrong
and what is allowed.
"""


def proxy_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for X-Forwarded-*: uvicorn believes them from
    127.0.0.1 unless told otherwise; pgfleet only from the proxies
    PGFLEET_TRUSTED_PROXIES names (none by default), so no client picks the
    address its rate limits count against."""
    proxies = settings.trusted_proxies.strip()
    if not proxies:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": proxies}


def create_app(platform: Platform | None = None, settings: Settings | None = None) -> FastAPI:
    """The API and console. With a `platform` (tests) the app uses it as it
    is; without, its lifespan builds one from settings, runs the background
    loop and the embedded workers, and closes it at the end."""
    owned = platform is None
    quiet_outage_noise()
    if platform is not None:
        domains.attach(platform)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop: BackgroundLoop | None = None
        if app.state.platform is None:
            app.state.platform = domains.attach(Platform(settings or get_settings()))
            if app.state.platform.settings.background_tasks:
                loop = BackgroundLoop(app.state.platform).start()
            # Embedded workers also pick up operations left over from before a restart.
            OperationsRuntime.of(app.state.platform).start_workers()
        app.state.limits = RateLimits(app.state.platform.settings)
        app.state.sql = SqlGateway(app.state.platform)
        await app.state.sql.open()
        try:
            yield
        finally:
            await app.state.sql.close()
            if loop is not None:
                loop.stop()
            if owned and app.state.platform is not None:
                app.state.platform.close()

    app = FastAPI(
        title="pgfleet",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI's own pages load Swagger UI and ReDoc from a CDN: blank on a
        # machine without internet. /docs is served from the package instead.
        docs_url=None,
        redoc_url=None,
    )
    app.state.platform = platform
    app.mount(
        DOCS_ASSETS,
        StaticFiles(directory=Path(fastapi_offline.__file__).parent / "static"),
        name="docs-assets",
    )

    @app.get("/docs", include_in_schema=False)
    async def _docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="pgfleet API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )

    @app.exception_handler(PgfleetError)
    async def _domain_error(request: Request, exc: PgfleetError) -> Response:
        if wants_page(request.url.path, request.headers.get("accept", "")):
            return console_error_page(exc)
        status, body, headers = to_http(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        fields = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                where = err.get("loc", ("body", 0))[-1]
                why = (err.get("ctx") or {}).get("error", "")
                parts.append(
                    f"the body is not valid JSON (at character {where}"
                    + (f": {why}" if why else "")
                    + ")"
                )
                fields.append("body")
                continue
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            fields.append(loc)
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSONResponse(
            {"error": {"code": "invalid_input", "message": "; ".join(parts), "fields": fields}},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Starlette's own errors (no such route, wrong method, a body that
        cannot be read) in the same envelope as every other error."""
        code, message = HTTP_ERRORS.get(exc.status_code, ("http_error", str(exc.detail)))
        status = exc.status_code
        if status == 400:  # a body that is not JSON at all (not even UTF-8)
            status, code = 422, "invalid_input"
            message = "the body is not valid JSON (it must be UTF-8 JSON)"
        elif exc.status_code == 404:
            message = f"no such path: {request.url.path} (the API is described at /docs)"
        elif exc.status_code == 405:
            allowed = allowed_methods(request)
            message = (
                f"{request.method} is not allowed on {request.url.path}; "
                f"allowed: {', '.join(allowed)}"
            )
            # Every method of the path, not only those of the route that matched.
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
        elif isinstance(exc.detail, str) and exc.status_code not in HTTP_ERRORS:
            message = exc.detail
        err = PgfleetError(message)
        err.status_code, err.code = status, code
        if wants_page(request.url.path, request.headers.get("accept", "")):
            return console_error_page(err, headers=exc.headers)
        status, body, headers = to_http(err)
        return JSONResponse(body, status_code=status, headers={**headers, **(exc.headers or {})})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        err = InternalError()
        if wants_page(request.url.path, request.headers.get("accept", "")):
            return console_error_page(err)
        status, body, headers = to_http(err)
        return JSONResponse(body, status_code=status, headers=headers)

    app.include_router(health_router)
    app.include_router(driver_router)
    app.include_router(
        v1, responses={401: ERRORS[401], **COMMON}, dependencies=[Depends(known_query_parameters)]
    )
    install_console(app)
    _document_refusals(app)
    # Middleware added later wraps what was added before: the metrics see the
    # SQL fast path's requests too.
    app.add_middleware(SqlFastPath)
    app.add_middleware(RateLimit)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders)
    return app


class BodyLimit:
    """Bodies over MAX_BODY_BYTES are refused with 413 in the error envelope,
    before they are read whole (by Content-Length, or as they arrive)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.refusal = json.dumps(to_http(BodyTooLarge())[1]).encode()

    async def _refuse(self, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self.refusal)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self.refusal})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > MAX_BODY_BYTES:
                await self._refuse(send)
                return
        seen = 0
        too_large = False
        started = False

        async def counting() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY_BYTES:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if too_large:
                return  # the app's answer to a cut-off body is replaced below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting, guarded)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await self._refuse(send)


# The 403s every route of a kind can answer, said once here rather than on
# each route (found missing from the schema by a newcomer).
_READ_ONLY_403 = (
    "The token is read-only (scope read): it may list, show and run SQL in mode ro, "
    "not change anything."
)
_ADMIN_403 = "The token is not an admin's (admins only)."
_RW_CONNECTION_403 = "A read-only token (scope read) asked for the read-write credentials."


def _document_refusals(app: FastAPI) -> None:
    """The schema lists 403 where a token's scope or owner refuses: every
    authenticated route that is not a read (a read-only token), every
    /v1/admin route, and the read-write connection."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = plain()
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for path, methods in schema.get("paths", {}).items():
            for method, op in methods.items():
                if "401" not in op.get("responses", {}):
                    continue  # no token asked for
                said = []
                if path.startswith("/v1/admin/"):
                    said.append(_ADMIN_403)
                if method not in ("get", "head", "options"):
                    said.append(_READ_ONLY_403)
                if path == "/v1/projects/{project_id}/connection":
                    said.append(_RW_CONNECTION_403)
                if said and "403" not in op["responses"]:
                    op["responses"]["403"] = {"description": " Or: ".join(said), "content": error}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route takes on this path. Asked of each route with
    the request's scope under each method: FastAPI keeps an included
    router's routes to itself (0.165), and `matches` is what every route,
    included or not, answers."""
    return [
        m
        for m in _METHODS
        if any(
            r.matches({**request.scope, "method": m})[0] == Match.FULL for r in request.app.routes
        )
    ]


HTTP_ERRORS = {
    400: ("bad_request", "the request could not be read"),
    404: ("not_found", "not found"),
    405: ("method_not_allowed", "method not allowed"),
    413: ("body_too_large", BodyTooLarge.__doc__ or ""),
}

# The console's pages run only their own script and style, load nothing from
# elsewhere and cannot be framed. /docs (Swagger UI) gets the framing rule only.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
_COMMON_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
_DOCS = ("/docs",)
DOCS_ASSETS = "/docs/assets"


class SecurityHeaders:
    """Headers every answer carries (plain ASGI: a few tuples per response)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.csp = [(b"content-security-policy", CSP.encode())]
        self.docs_csp = [(b"content-security-policy", b"frame-ancestors 'none'")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = _COMMON_HEADERS + (self.docs_csp if scope["path"].startswith(_DOCS) else self.csp)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class MetricsMiddleware:
    """Request counts and latencies per route template (plain ASGI: the
    decorator-style middleware costs about a millisecond per request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            platform = scope["app"].state.platform
            route = getattr(scope.get("route"), "path", "unmatched")
            if platform is not None:
                m = platform.metrics
                m.http_requests.labels(scope["method"], route, str(status[0])).inc()
                m.http_duration.labels(scope["method"], route).observe(time.perf_counter() - t0)
