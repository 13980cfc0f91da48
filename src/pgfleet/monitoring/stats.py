"""Fleet statistics from the platform DB: where tenants live and how each
region performs."""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from pgfleet.errors import InvalidInput
from pgfleet.monitoring import histogram
from pgfleet.platform.core import Platform
from pgfleet.regions import REGIONS

# Below this many statements in the window, percentiles are computed exactly
# from the raw logs; above it, from the hourly rollups: counts and averages
# over whole hours (the window rounded out to the hour), percentiles from
# their histograms (within one 25% bucket).
EXACT_LIMIT = 50_000
MAX_WINDOW = timedelta(days=31)
_WINDOW_RE = re.compile(r"^(\d{1,5})([mhd])$")


def parse_window(window: str) -> timedelta:
    m = _WINDOW_RE.match(window.strip())
    if not m:
        raise InvalidInput(
            f"window {window!r} is not valid; use a number and m, h or d, e.g. 30m, 24h, 7d",
            field="window",
        )
    n, unit = int(m.group(1)), m.group(2)
    td = {"m": timedelta(minutes=n), "h": timedelta(hours=n), "d": timedelta(days=n)}[unit]
    if td <= timedelta(0) or td > MAX_WINDOW:
        raise InvalidInput("window must be between 1m and 31d", field="window")
    return td


@dataclass
class TenantCounts:
    """Live (not deleted) projects counted in one pass over tenants."""

    by_region: dict[str, dict[str, int]]
    hosted: dict[str, int]
    by_server: dict[int, int]
    free: int
    paid: int


def tenant_counts(conn: Any) -> TenantCounts:
    by_region: dict[str, dict[str, int]] = {}
    hosted: dict[str, int] = defaultdict(int)
    by_server: dict[int, int] = defaultdict(int)
    free = paid = 0
    # tenant_counts is kept by triggers on tenants (migration 0005).
    for region, hosted_region, server_id, plan_type, status, n in conn.execute(
        "SELECT region, hosted_region, server_id, plan_type, status, n FROM tenant_counts "
        "WHERE status <> 'deleted' AND n <> 0"
    ):
        hosted_region = hosted_region or None
        server_id = server_id or None
        is_free = None if plan_type == "" else plan_type == "free"
        r = by_region.setdefault(
            region,
            {
                "tenants": 0,
                "free": 0,
                "paid": 0,
                "active": 0,
                "paused": 0,
                "failed": 0,
                "hosted_elsewhere": 0,
            },
        )
        r["tenants"] += n
        # Like the seed's query: a project without a plan is neither free nor paid.
        if is_free is not None:
            r["free" if is_free else "paid"] += n
        if status in ("active", "paused", "failed"):
            r[status] += n
        if hosted_region != region:
            r["hosted_elsewhere"] += n
        if hosted_region is not None:
            hosted[hosted_region] += n
        if server_id is not None:
            by_server[server_id] += n
        if is_free is True:
            free += n
        elif is_free is False:
            paid += n
    return TenantCounts(by_region, dict(hosted), dict(by_server), free, paid)


def region_stats(platform: Platform) -> dict[str, Any]:
    with platform.db.connection() as conn:
        counts = tenant_counts(conn)
        with conn.cursor(row_factory=dict_row) as cur:
            servers = cur.execute(
                """
                SELECT s.id, s.name, s.region, s.capacity, s.enabled,
                       h.ok, h.checked_at, h.latency_ms, h.connections_used, h.connections_max,
                       h.tenant_databases, h.bytes_used
                FROM servers s
                LEFT JOIN LATERAL (
                  SELECT * FROM server_health sh WHERE sh.server_id = s.id
                  ORDER BY checked_at DESC LIMIT 1) h ON true
                WHERE s.enabled ORDER BY s.region, s.id
                """
            ).fetchall()
    for srv in servers:
        srv["tenants"] = counts.by_server.get(srv["id"], 0)
    by_region: dict[str, dict[str, int]] = counts.by_region
    hosted = counts.hosted
    total = sum(r["tenants"] for r in by_region.values())
    out = []
    for reg in REGIONS:
        row = by_region.get(reg.id, {})
        mine = [s for s in servers if s["region"] == reg.id]
        out.append(
            {
                "region": reg.id,
                "name": reg.name,
                "flag": reg.flag,
                "status": "active" if mine else "metadata-only",
                "tenants": row.get("tenants", 0),
                "free": row.get("free", 0),
                "paid": row.get("paid", 0),
                "active": row.get("active", 0),
                "paused": row.get("paused", 0),
                "failed": row.get("failed", 0),
                "share": round(row.get("tenants", 0) / total, 4) if total else 0.0,
                "requested_not_hosted_here": row.get("hosted_elsewhere", 0),
                "hosted": hosted.get(reg.id, 0),
                "servers": [
                    {
                        "name": s["name"],
                        "tenants": s["tenants"],
                        "capacity": s["capacity"],
                        "healthy": s["ok"],
                        "checked_at": s["checked_at"],
                        "latency_ms": s["latency_ms"],
                        "connections_used": s["connections_used"],
                        "connections_max": s["connections_max"],
                        "databases": s["tenant_databases"],
                        "bytes": s["bytes_used"],
                    }
                    for s in mine
                ],
                "databases": sum(s["tenant_databases"] or 0 for s in mine),
                "bytes": sum(s["bytes_used"] or 0 for s in mine),
            }
        )
    return {
        "total_tenants": total,
        "requested_not_hosted": sum(r["requested_not_hosted_here"] for r in out),
        "regions": out,
    }


def _perf_row(
    key: dict[str, Any],
    count: int,
    errors: int,
    avg: float | None,
    p50: float | None,
    p95: float | None,
    p99: float | None,
) -> dict[str, Any]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    return {
        **key,
        "queries": count,
        "errors": errors,
        "error_rate": round(errors / count, 4) if count else 0.0,
        "avg_ms": r(avg),
        "p50_ms": r(p50),
        "p95_ms": r(p95),
        "p99_ms": r(p99),
    }


def performance(platform: Platform, window: str, *, by: str = "region") -> dict[str, Any]:
    """Per region (the one a project asked for, like the seed's query, or the
    hosting one with by=hosted_region) and route: counts, error rate, avg and
    p50/p95/p99 over the window."""
    td = parse_window(window)
    if by not in ("region", "hosted_region"):
        raise InvalidInput("by must be region or hosted_region", field="by")
    col = "region" if by == "region" else "hosted_region"
    with platform.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        # Never prepared: a time-window query's generic plan (what a prepared
        # statement switches to) does not know the window; a fresh plan costs
        # a fraction of a millisecond, the generic one here doubled the time.
        rolled = cur.execute(
            "SELECT coalesce(sum(count), 0) AS n FROM query_log_rollups "
            "WHERE bucket >= date_trunc('hour', now() - %s::interval)",
            (td,),
            prepare=False,
        ).fetchone()
        exact = rolled is None or rolled["n"] <= EXACT_LIMIT
        rows: list[dict[str, Any]] = []
        if exact:
            q = (
                "SELECT {col} AS key, route, count(*) AS n, "
                "count(*) FILTER (WHERE outcome <> 'ok') AS errors, "
                "avg(execution_time_ms) AS avg, percentile_cont(ARRAY[0.5, 0.95, 0.99]) "
                "WITHIN GROUP (ORDER BY execution_time_ms) AS p "
                "FROM query_logs WHERE executed_at > now() - %s::interval "
                "GROUP BY 1, 2 ORDER BY 1, 2"
            )
            for r in cur.execute(_with_col(q, col), (td,), prepare=False):
                rows.append(
                    _perf_row(
                        {by: r["key"], "route": r["route"]}, r["n"], r["errors"], r["avg"], *r["p"]
                    )
                )
        else:
            q = (
                "WITH r AS (SELECT * FROM query_log_rollups "
                "  WHERE bucket >= date_trunc('hour', now() - %s::interval)), "
                "totals AS (SELECT {col} AS key, route, sum(count) AS n, "
                "  sum(errors) AS errors, sum(sum_ms) AS sum_ms FROM r GROUP BY 1, 2), "
                "hist AS (SELECT key, route, array_agg(v ORDER BY i) AS hist FROM ("
                "  SELECT {col} AS key, route, i, sum(v) AS v "
                "  FROM r, unnest(hist) WITH ORDINALITY AS u(v, i) GROUP BY 1, 2, 3) h "
                "  GROUP BY 1, 2) "
                "SELECT t.*, h.hist FROM totals t JOIN hist h USING (key, route) ORDER BY 1, 2"
            )
            for r in cur.execute(_with_col(q, col), (td,), prepare=False):
                n = int(r["n"])
                hist = [int(x) for x in r["hist"]]
                rows.append(
                    _perf_row(
                        {by: r["key"], "route": r["route"]},
                        n,
                        int(r["errors"]),
                        r["sum_ms"] / n if n else None,
                        histogram.percentile(hist, 50),
                        histogram.percentile(hist, 95),
                        histogram.percentile(hist, 99),
                    )
                )
    return {"window": window, "by": by, "exact": exact, "rows": rows}


def _with_col(template: str, col: str) -> sql.Composed:
    return sql.SQL(template).format(col=sql.Identifier(col))


def project_performance(platform: Platform, tenant_id: uuid.UUID, window: str) -> dict[str, Any]:
    td = parse_window(window)
    with platform.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = [
            _perf_row({"route": r["route"]}, r["n"], r["errors"], r["avg"], *r["p"])
            for r in cur.execute(
                "SELECT route, count(*) AS n, count(*) FILTER (WHERE outcome <> 'ok') AS errors, "
                "avg(execution_time_ms) AS avg, percentile_cont(ARRAY[0.5, 0.95, 0.99]) "
                "WITHIN GROUP (ORDER BY execution_time_ms) AS p "
                "FROM query_logs WHERE tenant_id = %s AND executed_at > now() - %s::interval "
                "GROUP BY route ORDER BY route",
                (tenant_id, td),
                prepare=False,
            )
        ]
        top = cur.execute(
            "SELECT fingerprint, count(*) AS calls, avg(execution_time_ms) AS avg_ms, "
            "count(*) FILTER (WHERE outcome <> 'ok') AS errors "
            "FROM query_logs WHERE tenant_id = %s AND executed_at > now() - %s::interval "
            "GROUP BY fingerprint ORDER BY sum(execution_time_ms) DESC LIMIT 10",
            (tenant_id, td),
            prepare=False,
        ).fetchall()
    return {
        "window": window,
        "routes": rows,
        "top_statements": [
            {**t, "avg_ms": round(t["avg_ms"], 3) if t["avg_ms"] is not None else None} for t in top
        ],
    }
