"""The FastAPI application; domain errors become HTTP responses here, and
only here."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pgfleet import __version__
from pgfleet.api.routes import health_router, v1
from pgfleet.config import Settings, get_settings
from pgfleet.errors import PgfleetError
from pgfleet.monitoring.background import BackgroundLoop
from pgfleet.platform.core import Platform

DESCRIPTION = """\
pgfleet runs PostgreSQL databases for projects in several regions.

Every `/v1` call needs `Authorization: Bearer pgf_...`. Errors have the shape
`{"error": {"code": ..., "message": ...}}`; the message says what was wrong
and what is allowed.
"""


def create_app(platform: Platform | None = None, settings: Settings | None = None) -> FastAPI:
    owned = platform is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop: BackgroundLoop | None = None
        if app.state.platform is None:
            app.state.platform = Platform(settings or get_settings())
            if app.state.platform.settings.background_tasks:
                loop = BackgroundLoop(app.state.platform).start()
        try:
            yield
        finally:
            if loop is not None:
                loop.stop()
            if owned and app.state.platform is not None:
                app.state.platform.close()

    app = FastAPI(title="pgfleet", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.platform = platform

    @app.exception_handler(PgfleetError)
    async def _domain_error(request: Request, exc: PgfleetError) -> JSONResponse:
        body = {"code": exc.code, "message": exc.message, **exc.details}
        return JSONResponse({"error": body}, status_code=exc.status_code)

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

    @app.middleware("http")
    async def _metrics(request: Request, call_next: Any) -> Any:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        platform = app.state.platform
        if platform is not None:
            platform.metrics.http_requests.labels(
                request.method, path, str(response.status_code)
            ).inc()
            platform.metrics.http_duration.labels(request.method, path).observe(
                time.perf_counter() - t0
            )
        return response

    app.include_router(health_router)
    app.include_router(v1)
    return app
