"""The REST API's routes, one module per domain. `health_router` holds what
lives outside /v1 (/health, /ca.crt, /metrics); `driver_router` the HTTP
driver's POST /sql; `v1` everything under /v1.
Each route parses, calls one service function and formats."""

from fastapi import APIRouter

from pgfleet.api.routes import (
    accounts,
    admin,
    backups,
    catalog,
    health,
    monitoring,
    operations,
    projects,
    sql,
)

health_router = health.router
driver_router = sql.driver_router
v1 = APIRouter(prefix="/v1")
for module in (catalog, projects, backups, operations, sql, accounts, admin, monitoring):
    v1.include_router(module.router)

__all__ = ["driver_router", "health_router", "v1"]
