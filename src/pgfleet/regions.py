"""The region catalog, plans and the placement policy.

Everything here is pure: placement takes the servers and their loads and
returns a decision, so it is tested without a database.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from pgfleet.errors import NoCapacity, UnknownPlan, UnknownRegion


@dataclass(frozen=True)
class Region:
    id: str
    name: str
    flag: str
    # The seed's environment variable that names this region's host, if any.
    host_env: str | None = None


REGIONS: tuple[Region, ...] = (
    Region("us-east-1", "US East (N. Virginia)", "\U0001f1fa\U0001f1f8", "POSTGRES_HOST_US_EAST"),
    Region("us-west-1", "US West (N. California)", "\U0001f1fa\U0001f1f8"),
    Region("eu-central-1", "EU Central (Frankfurt)", "\U0001f1ea\U0001f1fa", "POSTGRES_HOST_EU"),
    Region("eu-west-1", "EU West (Ireland)", "\U0001f1ea\U0001f1fa"),
    Region(
        "ap-southeast-1", "Asia Pacific (Singapore)", "\U0001f1f8\U0001f1ec", "POSTGRES_HOST_APAC"
    ),
    Region("ap-northeast-1", "Asia Pacific (Tokyo)", "\U0001f1ef\U0001f1f5"),
)
REGIONS_BY_ID = {r.id: r for r in REGIONS}
REGION_IDS = tuple(r.id for r in REGIONS)
DEFAULT_REGION = "us-east-1"


def get_region(region_id: str) -> Region:
    try:
        return REGIONS_BY_ID[region_id]
    except KeyError:
        raise UnknownRegion(
            f"unknown region {region_id!r}; valid regions are: {', '.join(REGION_IDS)}",
            valid=list(REGION_IDS),
        ) from None


@dataclass(frozen=True)
class Plan:
    id: str
    name: str
    connection_limit: int
    statement_timeout_ms: int
    paid: bool
    max_result_rows: int = 10_000
    max_result_bytes: int = 10 * 1024 * 1024
    # Server connections each router may open to one project's database
    # (all its roles together): what clients through a router share.
    router_pool_size: int = 3


PLANS: tuple[Plan, ...] = (
    Plan(
        "free",
        "Free",
        connection_limit=10,
        statement_timeout_ms=15_000,
        paid=False,
        max_result_rows=5_000,
        max_result_bytes=5 * 1024 * 1024,
    ),
    Plan(
        "pro",
        "Pro",
        connection_limit=60,
        statement_timeout_ms=60_000,
        paid=True,
        max_result_rows=50_000,
        max_result_bytes=50 * 1024 * 1024,
        router_pool_size=10,
    ),
    Plan(
        "enterprise",
        "Enterprise",
        connection_limit=200,
        statement_timeout_ms=300_000,
        paid=True,
        max_result_rows=100_000,
        max_result_bytes=100 * 1024 * 1024,
        router_pool_size=25,
    ),
)
PLANS_BY_ID = {p.id: p for p in PLANS}
PLAN_IDS = tuple(p.id for p in PLANS)


def get_plan(plan_id: str) -> Plan:
    try:
        return PLANS_BY_ID[plan_id]
    except KeyError:
        raise UnknownPlan(
            f"unknown plan {plan_id!r}; valid plans are: {', '.join(PLAN_IDS)}",
            valid=list(PLAN_IDS),
        ) from None


class PlacementPolicy(StrEnum):
    REGIONAL = "regional"
    HYBRID = "hybrid"
    SINGLE = "single"


@dataclass(frozen=True)
class ServerLoad:
    """What placement needs to know about one server."""

    id: int
    name: str
    region: str
    capacity: int
    tenants: int
    is_primary: bool
    enabled: bool = True

    @property
    def free_slots(self) -> int:
        return self.capacity - self.tenants


@dataclass(frozen=True)
class Placement:
    server_id: int
    server_name: str
    hosted_region: str
    reason: str


def served_regions(servers: Sequence[ServerLoad]) -> set[str]:
    return {s.region for s in servers if s.enabled}


def choose_server(
    *,
    policy: PlacementPolicy,
    region: str,
    plan: str,
    servers: Sequence[ServerLoad],
    default_region: str = DEFAULT_REGION,
) -> Placement:
    """Decide which server hosts a new project.

    - regional: a server in the requested region; a metadata-only region
      (no server) falls back to the default region.
    - hybrid: the free plan goes to the default region's primary server, paid
      plans to their requested region (with the same fallback).
    - single: everything on the default region's primary server.
    Within the chosen region the least-loaded server with capacity wins.
    """
    get_region(region)
    plan_info = get_plan(plan)
    enabled = [s for s in servers if s.enabled]

    if policy is PlacementPolicy.SINGLE or (
        policy is PlacementPolicy.HYBRID and not plan_info.paid
    ):
        why = "single-server policy" if policy is PlacementPolicy.SINGLE else "free plan"
        return _primary_of(enabled, default_region, reason=f"{why}: primary of {default_region}")

    target = region
    reason = f"requested region {region}"
    if region not in served_regions(enabled):
        target = default_region
        reason = f"{region} is metadata-only; hosted in {default_region}"
    candidates = [s for s in enabled if s.region == target and s.free_slots > 0]
    if not candidates:
        raise NoCapacity(f"no server in region {target} has capacity left", region=target)
    best = min(candidates, key=lambda s: (s.tenants / max(s.capacity, 1), not s.is_primary, s.id))
    return Placement(best.id, best.name, best.region, reason)


def _primary_of(servers: Sequence[ServerLoad], region: str, *, reason: str) -> Placement:
    in_region = [s for s in servers if s.region == region]
    if not in_region:
        raise NoCapacity(f"region {region} has no server", region=region)
    primary = min(in_region, key=lambda s: (not s.is_primary, s.id))
    if primary.free_slots <= 0:
        raise NoCapacity(
            f"the primary server of {region} ({primary.name}) has no capacity left", region=region
        )
    return Placement(primary.id, primary.name, primary.region, reason)


# The seed's default hosts, used when neither the environment nor a registry
# names one.
_SEED_DEFAULT_HOSTS = {
    "us-east-1": "postgres-primary",
    "eu-central-1": "postgres-eu",
    "ap-southeast-1": "postgres-apac",
}


def get_regional_host(
    region: str, hosts: Mapping[str, str] | None = None, *, default: str = DEFAULT_REGION
) -> str:
    """The seed's `getRegionalHost`: the host for `region`.

    With `hosts` (region -> host of its primary server, from the registry),
    the seed's environment variables still win; without it, the seed's own
    defaults apply. An unknown or unserved region falls back to the default
    region's host.
    """
    table: dict[str, str] = dict(_SEED_DEFAULT_HOSTS) if hosts is None else dict(hosts)
    for r in REGIONS:
        if r.host_env and os.environ.get(r.host_env):
            table[r.id] = os.environ[r.host_env]
    if region in table:
        return table[region]
    if default in table:
        return table[default]
    raise NoCapacity(f"no server serves {region} nor the default region {default}")
