"""The expansion advisor: the seed's rule, as a pure function.

"If 80%+ users pick one non-default region -> deploy a server there", once
there are enough users to trust the share; plus any region whose servers are
near capacity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class AdvisorSettings:
    share_threshold: float = 0.8
    min_sample: int = 100
    capacity_threshold: float = 0.85


@dataclass(frozen=True)
class RegionCapacity:
    region: str
    servers: int
    tenants: int
    capacity: int


@dataclass(frozen=True)
class Recommendation:
    kind: Literal["deploy_server", "add_capacity"]
    region: str
    reason: str
    tenants: int
    share: float | None = None
    utilisation: float | None = None


def advise(
    *,
    requested: Mapping[str, int],
    capacity: Sequence[RegionCapacity],
    default_region: str,
    settings: AdvisorSettings = AdvisorSettings(),
) -> list[Recommendation]:
    """`requested`: live projects per requested region. `capacity`: per region
    with servers, their hosted projects and total capacity."""
    out: list[Recommendation] = []
    total = sum(requested.values())
    served = {c.region for c in capacity if c.servers > 0}
    if total >= settings.min_sample:
        for region, count in sorted(requested.items(), key=lambda kv: (-kv[1], kv[0])):
            if region == default_region or region in served:
                continue
            share = count / total
            if share >= settings.share_threshold:
                out.append(
                    Recommendation(
                        kind="deploy_server",
                        region=region,
                        tenants=count,
                        share=round(share, 4),
                        reason=(
                            f"{count} of {total} projects ({share:.0%}) picked {region}, "
                            f"which has no server (threshold {settings.share_threshold:.0%} "
                            f"of at least {settings.min_sample} projects): deploy a server "
                            f"in {region}"
                        ),
                    )
                )
    for c in sorted(capacity, key=lambda c: c.region):
        if c.servers == 0 or c.capacity <= 0:
            continue
        used = c.tenants / c.capacity
        if used >= settings.capacity_threshold:
            out.append(
                Recommendation(
                    kind="add_capacity",
                    region=c.region,
                    tenants=c.tenants,
                    utilisation=round(used, 4),
                    reason=(
                        f"{c.region} hosts {c.tenants} projects on {c.servers} server(s) "
                        f"with room for {c.capacity} ({used:.0%} used, threshold "
                        f"{settings.capacity_threshold:.0%}): add a server in {c.region}"
                    ),
                )
            )
    return out
