"""Statistics, the advisor and costs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from pgfleet.api.deps import AdminDep, OwnerDep, PlatformDep
from pgfleet.api.routes.common import (
    ERRORS,
)
from pgfleet.api.schemas import (
    WINDOW_PATTERN,
)
from pgfleet.monitoring import insights, stats
from pgfleet.monitoring.service import advisor_report, cost_report
from pgfleet.tenants import service

router = APIRouter()


WindowQ = Annotated[
    str,
    Query(
        description="How far back: a number and m, h or d (e.g. 30m, 24h, 7d; max 31d).",
        json_schema_extra={"pattern": WINDOW_PATTERN},
    ),
]


@router.get(
    "/projects/{project_id}/stats",
    tags=["monitoring"],
    summary="A project's query stats",
    responses={404: ERRORS[404], 422: ERRORS[422]},
)
def project_stats(
    project_id: str, platform: PlatformDep, owner: OwnerDep, window: WindowQ = "24h"
) -> dict[str, Any]:
    """Two sources, labelled.

    - Through the SQL API (`query_logs`, within `window`): per route (rw/ro)
      query count, error rate, avg/p50/p95/p99 in ms, and the statements
      that took the most time (`top_statements`, as fingerprints, never
      values).
    - From every client (`server_statements`: the server's
      `pg_stat_statements`, sampled every PGFLEET_INSIGHTS_INTERVAL_S):
      each normalised statement (constants as `$1`) with calls, total and
      mean time, rows and shared blocks hit/read, cumulative since
      `since`. Utility statements (DDL, ALTER ROLE ...) are not tracked."""
    project = service.get_project(platform, owner, project_id)
    return {
        "project_id": str(project.id),
        "source": "sql_api",
        **stats.project_performance(platform, project.id, window),
        "server_statements": insights.project_statements(platform, project.id),
    }


@router.get("/admin/stats/regions", tags=["monitoring"], summary="Where tenants live")
def stats_regions(platform: PlatformDep, admin: AdminDep) -> dict[str, Any]:
    """Per region: tenants (free/paid; active/paused/failed), share of all,
    how many asked for it but live elsewhere, servers with their last health
    check, databases and bytes hosted."""
    return stats.region_stats(platform)


@router.get(
    "/admin/stats/performance",
    tags=["monitoring"],
    summary="How each region performs",
    responses={422: ERRORS[422]},
)
def stats_performance(
    platform: PlatformDep,
    admin: AdminDep,
    window: WindowQ = "24h",
    by: Annotated[
        Literal["region", "hosted_region"],
        Query(
            description="Group by the requested region (like the seed's query) or the hosting one"
        ),
    ] = "region",
) -> dict[str, Any]:
    """Per region and route: query count, error rate, avg, p50, p95, p99 (ms)
    of the SQL API's statements (`source: sql_api`). `exact` is false when
    percentiles come from per-minute histograms (large windows), which are
    within 25% of the exact value.

    Beside them, `server_statements`: per hosting region, every client's
    statements from the servers' pg_stat_statements (calls, total and mean
    ms, cumulative since `since`), and `sampling`: each server's last
    sampling round (when, how long it took, statements read, rows written)."""
    return {
        **stats.performance(platform, window, by=by),
        "source": "sql_api",
        "server_statements": insights.region_statements(platform),
        "sampling": insights.last_rounds(platform),
    }


@router.get("/admin/advisor", tags=["monitoring"], summary="Expansion advisor")
def advisor(platform: PlatformDep, admin: AdminDep) -> dict[str, Any]:
    """The seed's rule: when at least `min_sample` projects exist and a share of
    `share_threshold` or more picked one non-default region without a server,
    deploy one there; also any region whose servers are near capacity. Each
    recommendation says why, with the numbers."""
    return advisor_report(platform)


@router.get("/admin/costs", tags=["monitoring"], summary="Monthly cost estimate")
def costs(platform: PlatformDep, admin: AdminDep) -> dict[str, Any]:
    """Monthly cost per region and per tenant from the configured server price
    (the seed's ~40 EUR per server by default), and the seed's expansion
    options side by side: current fleet, 3 servers, hybrid, full cloud."""
    return cost_report(platform)
