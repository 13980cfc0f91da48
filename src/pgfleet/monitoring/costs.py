"""Monthly cost estimates, as pure functions: the fleet as it is, and the
seed's expansion options side by side."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Prices:
    """Defaults are the seed guide's figures."""

    currency: str = "EUR"
    server_monthly: float = 40.0  # a Hetzner CX41/AX41 per region
    # Managed per-project prices are quoted in USD; converted with usd_to_eur.
    usd_to_eur: float = 0.92
    managed_project_usd: float = 25.0  # Supabase per project (premium tier)
    cloud_tenant_usd_low: float = 20.0  # Neon/Supabase per active tenant
    cloud_tenant_usd_high: float = 50.0
    region_server_monthly: Mapping[str, float] = field(default_factory=dict)

    def server_price(self, region: str) -> float:
        return self.region_server_monthly.get(region, self.server_monthly)


@dataclass(frozen=True)
class RegionCost:
    region: str
    servers: int
    tenants: int
    monthly: float
    per_tenant: float | None


@dataclass(frozen=True)
class OptionCost:
    id: str
    name: str
    monthly: float
    monthly_high: float | None
    description: str


@dataclass(frozen=True)
class CostReport:
    currency: str
    regions: list[RegionCost]
    total_monthly: float
    per_tenant: float | None
    options: list[OptionCost]


def estimate(
    *,
    servers_per_region: Mapping[str, int],
    tenants_per_region: Mapping[str, int],
    free_tenants: int,
    paid_tenants: int,
    prices: Prices = Prices(),
) -> CostReport:
    """`tenants_per_region` counts projects by the region that hosts them."""
    regions = sorted(set(servers_per_region) | set(tenants_per_region))
    rows = []
    for r in regions:
        n_srv = servers_per_region.get(r, 0)
        n_ten = tenants_per_region.get(r, 0)
        monthly = round(n_srv * prices.server_price(r), 2)
        rows.append(
            RegionCost(r, n_srv, n_ten, monthly, round(monthly / n_ten, 2) if n_ten else None)
        )
    total = round(sum(r.monthly for r in rows), 2)
    tenants = free_tenants + paid_tenants
    fx = prices.usd_to_eur if prices.currency == "EUR" else 1.0
    # USD prices are converted at a stated rate, never added as they are.
    rate = (
        f", converted at {prices.usd_to_eur:g} EUR per USD (PGFLEET_COST_USD_TO_EUR)"
        if prices.currency == "EUR"
        else ""
    )
    options = [
        OptionCost(
            "current",
            "Current fleet",
            total,
            None,
            f"{sum(servers_per_region.values())} server(s) as configured today",
        ),
        OptionCost(
            "three_servers",
            "3 servers (US, EU, APAC)",
            round(3 * prices.server_monthly, 2),
            None,
            f"one server per region at {prices.server_monthly:.0f} {prices.currency}/month",
        ),
        OptionCost(
            "hybrid",
            "Hybrid: free tier on one server, paid projects managed",
            round(prices.server_monthly + paid_tenants * prices.managed_project_usd * fx, 2),
            None,
            f"1 server for {free_tenants} free project(s) + {paid_tenants} paid project(s) "
            f"at {prices.managed_project_usd:.0f} USD each{rate}",
        ),
        OptionCost(
            "full_cloud",
            "Full cloud (Neon/Supabase) per tenant",
            round(tenants * prices.cloud_tenant_usd_low * fx, 2),
            round(tenants * prices.cloud_tenant_usd_high * fx, 2),
            f"{tenants} project(s) at {prices.cloud_tenant_usd_low:.0f}-"
            f"{prices.cloud_tenant_usd_high:.0f} USD each{rate}",
        ),
    ]
    return CostReport(
        currency=prices.currency,
        regions=rows,
        total_monthly=total,
        per_tenant=round(total / tenants, 2) if tenants else None,
        options=options,
    )
