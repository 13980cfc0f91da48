"""Advisor and cost reports from the live platform data."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pgfleet.monitoring.advisor import AdvisorSettings, RegionCapacity, advise
from pgfleet.monitoring.costs import Prices, estimate
from pgfleet.monitoring.stats import tenant_counts
from pgfleet.platform.core import Platform


def _counts(platform: Platform) -> dict[str, Any]:
    with platform.db.connection() as conn:
        c = tenant_counts(conn)
    return {
        "requested": {r: v["tenants"] for r, v in c.by_region.items()},
        "hosted": c.hosted,
        "by_server": c.by_server,
        "free": c.free,
        "paid": c.paid,
    }


def advisor_report(platform: Platform) -> dict[str, Any]:
    s = platform.settings
    counts = _counts(platform)
    cap: dict[str, RegionCapacity] = {}
    for srv in platform.servers.all(enabled_only=True):
        c = cap.get(srv.region, RegionCapacity(srv.region, 0, 0, 0))
        cap[srv.region] = RegionCapacity(
            srv.region,
            c.servers + 1,
            c.tenants + counts["by_server"].get(srv.id, 0),
            c.capacity + srv.capacity,
        )
    settings = AdvisorSettings(
        share_threshold=s.advisor_share_threshold,
        min_sample=s.advisor_min_sample,
        capacity_threshold=s.advisor_capacity_threshold,
    )
    recs = advise(
        requested=counts["requested"],
        capacity=list(cap.values()),
        default_region=s.default_region,
        settings=settings,
    )
    return {
        "settings": asdict(settings),
        "total_tenants": sum(counts["requested"].values()),
        "requested": counts["requested"],
        "recommendations": [asdict(r) for r in recs],
    }


def cost_report(platform: Platform) -> dict[str, Any]:
    s = platform.settings
    counts = _counts(platform)
    servers: dict[str, int] = {}
    for srv in platform.servers.all(enabled_only=True):
        servers[srv.region] = servers.get(srv.region, 0) + 1
    prices = Prices(
        currency=s.cost_currency,
        server_monthly=s.cost_server_monthly,
        usd_to_eur=s.cost_usd_to_eur,
        managed_project_usd=s.cost_managed_project_usd,
        cloud_tenant_usd_low=s.cost_cloud_tenant_usd_low,
        cloud_tenant_usd_high=s.cost_cloud_tenant_usd_high,
    )
    report = estimate(
        servers_per_region=servers,
        tenants_per_region=counts["hosted"],
        free_tenants=counts["free"],
        paid_tenants=counts["paid"],
        prices=prices,
    )
    return asdict(report)
