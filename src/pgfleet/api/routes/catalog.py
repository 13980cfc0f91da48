"""The catalog: regions (and what they host) and plans."""

from __future__ import annotations

from fastapi import APIRouter

from pgfleet.api.deps import OwnerDep, PlatformDep
from pgfleet.api.schemas import PlanList, PlanOut, RegionOut
from pgfleet.regions import PLANS, REGIONS

router = APIRouter()


@router.get("/regions", tags=["regions"], summary="The region catalog")
def list_regions(platform: PlatformDep, owner: OwnerDep) -> list[RegionOut]:
    """All six regions; `active` ones have servers, `metadata-only` ones are
    selectable and hosted in the default region until they get one."""
    counts: dict[str, int] = {}
    for s in platform.servers.all(enabled_only=True):
        counts[s.region] = counts.get(s.region, 0) + 1
    return [
        RegionOut(
            id=r.id,
            name=r.name,
            flag=r.flag,
            status="active" if counts.get(r.id) else "metadata-only",
            server_count=counts.get(r.id, 0),
            default=r.id == platform.settings.default_region,
        )
        for r in REGIONS
    ]


@router.get("/plans", tags=["plans"], summary="The plans: limits, retention, price")
def list_plans(platform: PlatformDep, owner: OwnerDep) -> PlanList:
    """Every plan a project can be on, with its limits, its backups'
    retention and its price (pro at PGFLEET_COST_MANAGED_PROJECT_USD, the
    seed's managed-project figure; enterprise on request)."""
    prices = {"free": 0.0, "pro": platform.settings.cost_managed_project_usd}
    return PlanList(
        plans=[
            PlanOut(
                id=p.id,
                name=p.name,
                paid=p.paid,
                monthly_price_usd=prices.get(p.id),
                connection_limit=p.connection_limit,
                statement_timeout_ms=p.statement_timeout_ms,
                max_result_rows=p.max_result_rows,
                max_result_bytes=p.max_result_bytes,
                router_pool_size=p.router_pool_size,
                router_clients=p.router_clients,
                pitr_days=p.pitr_days,
                snapshot_every_h=p.snapshot_every_h,
                snapshot_keep=p.snapshot_keep,
                snapshot_max_age_days=p.snapshot_max_age_days,
            )
            for p in PLANS
        ]
    )
