"""The catalog: regions (and what they host)."""

from __future__ import annotations

from fastapi import APIRouter

from pgfleet.api.deps import OwnerDep, PlatformDep
from pgfleet.api.schemas import (
    RegionOut,
)
from pgfleet.regions import REGIONS

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
