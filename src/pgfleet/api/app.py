"""The FastAPI application; domain errors become HTTP responses here, and
only here."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgfleet import __version__
from pgfleet.api.routes import health_router, v1
from pgfleet.api.sqlpath import SqlFastPath
from pgfleet.config import Settings, get_settings
from pgfleet.errors import PgfleetError, error_content
from pgfleet.monitoring.background import BackgroundLoop
from pgfleet.platform.core import Platform
from pgfleet.tenants.sql import SqlGateway

DESCRIPTION = """\
pgfleet runs PostgreSQL databases for projects in several regions.

Every `/v1` call needs `Authorization: Bearer pgf_...`. Errors have the shape
`{"error": {"code": ..., "message": ...}}`; the message says what was wrong
and what is allowed.
"""


MAX_BODY_BYTES = 4 * 1024 * 1024


def create_app(platform: Platform | None = None, settings: Settings | None = None) -> FastAPI:
    owned = platform is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop: BackgroundLoop | None = None
        if app.state.platform is None:
            app.state.platform = Platform(settings or get_settings())
            if app.state.platform.settings.background_tasks:
                loop = BackgroundLoop(app.state.platform).start()
            # Embedded workers also pick up operations left over from before a restart.
            app.state.platform.ops.start_workers()
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
        # The largest legitimate body is a SQL call: 100,000 characters and
        # 1,000 params. Anything bigger is refused (413) before it is read.
        max_body_size=MAX_BODY_BYTES,
    )
    app.state.platform = platform

    @app.exception_handler(PgfleetError)
    async def _domain_error(request: Request, exc: PgfleetError) -> JSONResponse:
        return JSONResponse(error_content(exc), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        fields = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            fields.append(loc)
            parts.append(f"{loc}: {err.get('msg')}")
        return JSONResponse(
            {"error": {"code": "invalid_input", "message": "; ".join(parts), "fields": fields}},
            status_code=422,
        )

    app.include_router(health_router)
    app.include_router(v1)
    from pgfleet.web.routes import install as install_console

    install_console(app)
    # Middleware added later wraps what was added before: the metrics see the
    # SQL fast path's requests too.
    app.add_middleware(SqlFastPath)
    app.add_middleware(MetricsMiddleware)
    return app


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
