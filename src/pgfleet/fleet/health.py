"""Reachability of the platform DB and of every regional server."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from pgfleet.fleet.registry import ServerRecord
from pgfleet.regions import REGIONS

if TYPE_CHECKING:
    from pgfleet.platform.core import Platform


@dataclass(frozen=True)
class ServerHealth:
    name: str
    region: str
    ok: bool
    latency_ms: float | None
    version: str | None
    error: str | None
    server_id: int = 0
    connections_used: int | None = None
    connections_max: int | None = None
    databases: int | None = None
    tenant_databases: int | None = None
    bytes_used: int | None = None


def check_server(server: ServerRecord, timeout_s: float = 2.0) -> ServerHealth:
    """Reachability, round trip, version, connections used / max, database
    count and disk used by databases."""
    start = time.perf_counter()
    try:
        with psycopg.connect(**server.admin_conninfo(timeout_s), autocommit=True) as conn:
            latency = round((time.perf_counter() - start) * 1000, 2)
            row = conn.execute(
                """
                SELECT current_setting('server_version'),
                       (SELECT count(*) FROM pg_stat_activity
                        WHERE backend_type = 'client backend'),
                       current_setting('max_connections')::int,
                       (SELECT count(*) FROM pg_database WHERE NOT datistemplate),
                       (SELECT count(*) FROM pg_database WHERE datname LIKE 'tenant\\_%'),
                       (SELECT sum(pg_database_size(oid)) FROM pg_database
                        WHERE datconnlimit <> -2)::bigint
                """
            ).fetchone()
        assert row is not None
        return ServerHealth(
            server.name,
            server.region,
            True,
            latency,
            row[0],
            None,
            server.id,
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
        )
    except psycopg.Error as e:
        # Only the class of failure: messages can carry hosts and user names.
        reason = "unreachable" if isinstance(e, psycopg.OperationalError) else "error"
        return ServerHealth(server.name, server.region, False, None, None, reason, server.id)


def check_all(platform: Platform) -> list[ServerHealth]:
    servers = platform.servers.all(enabled_only=True)
    if not servers:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(servers))) as ex:
        return list(ex.map(check_server, servers))


def record(platform: Platform, checks: list[ServerHealth]) -> None:
    """Keep the checks as history (server_health), a week of it."""
    with platform.db.connection() as conn, conn.transaction():
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO server_health (server_id, ok, latency_ms, version, "
                "connections_used, connections_max, databases, tenant_databases, bytes_used, "
                "error) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (
                        c.server_id,
                        c.ok,
                        c.latency_ms,
                        c.version,
                        c.connections_used,
                        c.connections_max,
                        c.databases,
                        c.tenant_databases,
                        c.bytes_used,
                        c.error,
                    )
                    for c in checks
                ],
            )
        conn.execute("DELETE FROM server_health WHERE checked_at < now() - interval '7 days'")


def latest_recorded(platform: Platform) -> list[ServerHealth]:
    """The last recorded check of every enabled server (whichever process
    made it: one per round does)."""
    with platform.db.connection() as conn:
        rows = conn.execute(
            "SELECT s.name, s.region, h.ok, h.latency_ms, h.version, h.error, s.id, "
            "h.connections_used, h.connections_max, h.databases, h.tenant_databases, "
            "h.bytes_used FROM servers s CROSS JOIN LATERAL (SELECT * FROM server_health h "
            "WHERE h.server_id = s.id ORDER BY h.checked_at DESC LIMIT 1) h "
            "WHERE s.enabled ORDER BY s.id"
        ).fetchall()
    return [ServerHealth(*r) for r in rows]


def fleet_health(platform: Platform) -> dict[str, Any]:
    try:
        platform.ping()
        checks = check_all(platform)
    except Exception:
        return {
            "status": "down",
            "reasons": ["the platform database cannot be reached"],
            "platform_db": {"ok": False},
            "regions": {},
        }
    regions: dict[str, Any] = {}
    reasons: list[str] = []
    for r in REGIONS:
        mine = [c for c in checks if c.region == r.id]
        if not mine:
            status = "metadata-only"
        elif all(c.ok for c in mine):
            status = "ok"
        else:
            status = "degraded"
            down = ", ".join(c.name for c in mine if not c.ok)
            reasons.append(f"region {r.id}: server {down} cannot be reached")
        regions[r.id] = {
            "status": status,
            "servers": [
                {
                    "name": c.name,
                    "ok": c.ok,
                    "latency_ms": c.latency_ms,
                    "version": c.version,
                    "error": c.error,
                }
                for c in mine
            ],
        }
    from pgfleet.operations.store import deadline_summary

    try:
        with platform.db.connection() as conn:
            ops = deadline_summary(conn, alive_within_s=platform.settings.worker_stalled_s)
    except Exception:
        return {
            "status": "down",
            "reasons": ["the platform database cannot be reached"],
            "platform_db": {"ok": False},
            "regions": {},
        }
    if ops["past_deadline"]:
        reasons.append(f"{ops['past_deadline']} operation(s) past their deadline")
    if ops["workers"] == 0:
        reasons.append(
            "no operations worker is alive: operations wait until one runs "
            "(an API process starts one; `pgfleet worker` adds more)"
        )
    return {
        "status": "degraded" if reasons else "ok",
        "reasons": reasons,
        "platform_db": {"ok": True},
        "regions": regions,
        "operations": {
            "scheduled": ops["scheduled"],
            "running": ops["running"],
            "past_deadline": ops["past_deadline"],
            "missed": [
                {
                    "id": str(m["id"]),
                    "type": m["type"],
                    "project_id": str(m["tenant_id"]) if m["tenant_id"] else None,
                    "status": m["status"],
                    "current_step": m["current_step"],
                    "deadline": m["deadline"].isoformat(),
                }
                for m in ops["missed"]
            ],
            "workers": ops["workers"],
        },
    }
