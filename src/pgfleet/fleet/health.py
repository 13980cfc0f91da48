"""Reachability of the platform DB and of every regional server."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg

from pgfleet.fleet.registry import ServerRecord
from pgfleet.platform.core import Platform
from pgfleet.regions import REGIONS


@dataclass(frozen=True)
class ServerHealth:
    name: str
    region: str
    ok: bool
    latency_ms: float | None
    version: str | None
    error: str | None


def check_server(server: ServerRecord, timeout_s: float = 2.0) -> ServerHealth:
    start = time.perf_counter()
    try:
        with psycopg.connect(**server.admin_conninfo(timeout_s), autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        return ServerHealth(
            server.name,
            server.region,
            True,
            round((time.perf_counter() - start) * 1000, 2),
            version[0] if version else None,
            None,
        )
    except psycopg.Error as e:
        # Only the class of failure: messages can carry hosts and user names.
        reason = "unreachable" if isinstance(e, psycopg.OperationalError) else "error"
        return ServerHealth(server.name, server.region, False, None, None, reason)


def fleet_health(platform: Platform) -> dict[str, Any]:
    try:
        platform.ping()
        servers = platform.servers.all(enabled_only=True)
    except Exception:
        return {"status": "down", "platform_db": {"ok": False}, "regions": {}}
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(servers)))) as ex:
        checks = list(ex.map(check_server, servers))
    regions: dict[str, Any] = {}
    degraded = False
    for r in REGIONS:
        mine = [c for c in checks if c.region == r.id]
        if not mine:
            status = "metadata-only"
        elif all(c.ok for c in mine):
            status = "ok"
        else:
            status = "degraded"
            degraded = True
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
    return {
        "status": "degraded" if degraded else "ok",
        "platform_db": {"ok": True},
        "regions": regions,
    }
