"""Server health as the product sees it: checks recorded as history
(server_health, a week of it), the latest recorded check of each server
(what /metrics and a create's fail-fast read), and /health's answer."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pgfleet.fleet.health import ServerHealth, check_all
from pgfleet.fleet.router import reachable
from pgfleet.operations.store import deadline_summary
from pgfleet.platform.core import Platform
from pgfleet.regions import REGIONS


def record(platform: Platform, checks: list[ServerHealth]) -> None:
    """Keep the checks as history (server_health), a week of it."""
    with platform.db.connection() as conn, conn.transaction():
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO server_health (server_id, ok, latency_ms, version, "
                "connections_used, connections_max, databases, tenant_databases, bytes_used, "
                "spares_ready, error) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
                        c.spares_ready,
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
            "h.bytes_used, h.spares_ready FROM servers s "
            "CROSS JOIN LATERAL (SELECT * FROM server_health h "
            "WHERE h.server_id = s.id ORDER BY h.checked_at DESC LIMIT 1) h "
            "WHERE s.enabled ORDER BY s.id"
        ).fetchall()
    return [ServerHealth(*r) for r in rows]


def router_states(platform: Platform) -> list[dict[str, Any]]:
    """Each router: does its port accept a connection?"""
    routers = platform.routers
    if routers is None:
        return []
    return [
        {
            "name": spec.name,
            "region": spec.region,
            "pooling": spec.pool_mode,
            "port": spec.port,
            "ok": reachable(routers.host, spec.port, timeout=0.5),
        }
        for spec in routers.specs
    ]


def fleet_health(platform: Platform) -> dict[str, Any]:
    try:
        platform.ping()
        checks = check_all(platform.servers.all(enabled_only=True))
        record_if_stale(platform, checks)
    except Exception:
        return {
            "status": "down",
            "reasons": ["the platform database cannot be reached"],
            "platform_db": {"ok": False},
            "regions": {},
        }
    regions: dict[str, Any] = {}
    reasons: list[str] = []
    routers = router_states(platform)
    for r in REGIONS:
        mine = [c for c in checks if c.region == r.id]
        my_routers = [x for x in routers if x["region"] == r.id]
        failing = [c for c in mine if c.ok and c.archive_failing]
        if not mine:
            status = "metadata-only"
        elif all(c.ok for c in mine) and all(x["ok"] for x in my_routers) and not failing:
            status = "ok"
        else:
            status = "degraded"
            down = ", ".join(c.name for c in mine if not c.ok)
            if down:
                reasons.append(f"region {r.id}: server {down} cannot be reached")
            stopped = ", ".join(x["name"] for x in my_routers if not x["ok"])
            if stopped:
                reasons.append(
                    f"region {r.id}: router {stopped} is not running (`pgfleet up` starts it again)"
                )
            for c in failing:
                since = (
                    f"; last success {c.last_archived_at:%Y-%m-%d %H:%M:%S}Z"
                    if c.last_archived_at
                    else ""
                )
                reasons.append(
                    f"region {r.id}: server {c.name} cannot archive its WAL{since} (the backup "
                    "storage is unwritable or missing; the server keeps serving)"
                )
        regions[r.id] = {
            "routers": [{k: v for k, v in x.items() if k != "region"} for x in my_routers],
            "status": status,
            "servers": [
                {
                    "name": c.name,
                    "ok": c.ok,
                    "latency_ms": c.latency_ms,
                    "version": c.version,
                    "error": c.error,
                    "archiving": {
                        "mode": c.archive_mode,
                        "failing": c.archive_failing,
                        "last_archived_at": (
                            c.last_archived_at.isoformat() if c.last_archived_at else None
                        ),
                        "lag_bytes": c.archive_lag_bytes,
                    },
                }
                for c in mine
            ],
        }
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


def record_if_stale(platform: Platform, checks: list[ServerHealth], min_age_s: float = 1.0) -> None:
    """Record checks made for /health too (what a create's fail-fast reads):
    a server whose state changed at once, the others at most once a second
    however often /health is called."""
    with platform.db.connection() as conn:
        latest = {
            r[0]: (r[1], r[2])
            for r in conn.execute(
                "SELECT DISTINCT ON (server_id) server_id, ok, "
                "checked_at > now() - %s AS fresh FROM server_health "
                "WHERE server_id = ANY(%s) ORDER BY server_id, checked_at DESC",
                (timedelta(seconds=min_age_s), [c.server_id for c in checks]),
            )
        }
    stale = [
        c
        for c in checks
        if c.server_id not in latest or latest[c.server_id][0] != c.ok or not latest[c.server_id][1]
    ]
    if stale:
        record(platform, stale)


def known_down(platform: Platform, server_id: int) -> bool:
    """Whether the server's latest recorded check, made within the last
    three health intervals, failed (an old failure says nothing)."""
    horizon = timedelta(seconds=3 * platform.settings.health_interval_s)
    with platform.db.connection() as conn:
        row = conn.execute(
            "SELECT ok FROM server_health WHERE server_id = %s AND checked_at > now() - %s "
            "ORDER BY checked_at DESC LIMIT 1",
            (server_id, horizon),
        ).fetchone()
    return row is not None and not row[0]


def install_gauges(platform: Platform) -> None:
    """Server health gauges in /metrics, from the fleet's last recorded checks
    (with several API processes only one runs each round)."""

    def read() -> dict[str, list[tuple[dict[str, str], float]]]:
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for h in latest_recorded(platform):
            lbl = {"server": h.name, "region": h.region}
            out.setdefault("pgfleet_server_up", []).append((lbl, 1.0 if h.ok else 0.0))
            if h.latency_ms is not None:
                out.setdefault("pgfleet_server_latency_seconds", []).append(
                    (lbl, h.latency_ms / 1000)
                )
            for key, attr in (
                ("pgfleet_server_connections", h.connections_used),
                ("pgfleet_server_max_connections", h.connections_max),
                ("pgfleet_server_databases", h.tenant_databases),
                ("pgfleet_spares_ready", h.spares_ready),
            ):
                if attr is not None:
                    out.setdefault(key, []).append((lbl, float(attr)))
        return out

    platform.metrics.add_state(read)
