"""The FastAPI application; domain errors become HTTP responses here, and
only here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pgfleet import __version__
from pgfleet.api.routes import health_router, v1
from pgfleet.config import Settings, get_settings
from pgfleet.errors import PgfleetError
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
        if app.state.platform is None:
            app.state.platform = Platform(settings or get_settings())
        try:
            yield
        finally:
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

    app.include_router(health_router)
    app.include_router(v1)
    return app
