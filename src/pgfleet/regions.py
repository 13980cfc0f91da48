"""The region catalog, plans and the placement policy.

Everything here is pure: placement takes the servers and their loads and
returns a decision, so it is tested without a database.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from pgfleet.errors import InvalidInput, NoCapacity, ResidencyViolation, UnknownPlan, UnknownRegion


@dataclass(frozen=True)
class Region:
    id: str
    name: str
    flag: str
    # The seed's environment variable that names this region's host, if any.
    host_env: str | None = None
    # The jurisdiction a residency rule names (`eu`, `us`, `apac`).
    jurisdiction: str = ""


REGIONS: tuple[Region, ...] = (
    Region(
        "us-east-1", "US East (N. Virginia)", "\U0001f1fa\U0001f1f8", "POSTGRES_HOST_US_EAST", "us"
    ),
    Region("us-west-1", "US West (N. California)", "\U0001f1fa\U0001f1f8", None, "us"),
    Region(
        "eu-central-1", "EU Central (Frankfurt)", "\U0001f1ea\U0001f1fa", "POSTGRES_HOST_EU", "eu"
    ),
    Region("eu-west-1", "EU West (Ireland)", "\U0001f1ea\U0001f1fa", None, "eu"),
    Region(
        "ap-southeast-1",
        "Asia Pacific (Singapore)",
        "\U0001f1f8\U0001f1ec",
        "POSTGRES_HOST_APAC",
        "apac",
    ),
    Region("ap-northeast-1", "Asia Pacific (Tokyo)", "\U0001f1ef\U0001f1f5", None, "apac"),
)
REGIONS_BY_ID = {r.id: r for r in REGIONS}
REGION_IDS = tuple(r.id for r in REGIONS)
DEFAULT_REGION = "us-east-1"

# Data-residency rules a project can carry: its database, its backups and its
# restores stay in regions of that jurisdiction.
RESIDENCY_RULES = ("eu", "us", "apac")

# Where a server's backups go by default: the paired region, another region
# of the same jurisdiction (a region without a server can hold backups).
BACKUP_PAIRS = {
    "us-east-1": "us-west-1",
    "us-west-1": "us-east-1",
    "eu-central-1": "eu-west-1",
    "eu-west-1": "eu-central-1",
    "ap-southeast-1": "ap-northeast-1",
    "ap-northeast-1": "ap-southeast-1",
}


def get_region(region_id: str) -> Region:
    """The region `region_id` names (any case, surrounding spaces ignored);
    an unknown one is refused with the closest id suggested."""
    found = REGIONS_BY_ID.get(region_id.strip().lower())
    if found is not None:
        return found
    close = difflib.get_close_matches(region_id.strip().lower(), REGION_IDS, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UnknownRegion(
        f"unknown region {region_id!r}; {hint}valid regions are: {', '.join(REGION_IDS)}",
        valid=list(REGION_IDS),
        **({"suggestion": close[0]} if close else {}),
    )


def check_residency_rule(rule: str | None) -> str | None:
    """A residency rule as given (None or "" for none), or InvalidInput."""
    if rule is None or rule == "":
        return None
    if rule not in RESIDENCY_RULES:
        raise InvalidInput(
            f"unknown residency rule {rule!r}; valid rules are: {', '.join(RESIDENCY_RULES)} "
            "(or none)",
            field="residency",
            valid=list(RESIDENCY_RULES),
        )
    return rule


def residency_allows(rule: str | None, region: str) -> bool:
    """May data of a project with `rule` live in `region`?"""
    return rule is None or get_region(region).jurisdiction == rule


def require_residency(rule: str | None, region: str, *, what: str) -> None:
    """Refuse (409) when `what` (\"its database\", \"a restore\", ...) would
    take the data of a project with `rule` into `region`."""
    if not residency_allows(rule, region):
        allowed = ", ".join(r.id for r in REGIONS if r.jurisdiction == rule)
        raise ResidencyViolation(
            f"the project's residency rule is {rule!r}: {what} cannot be in {region} "
            f"({get_region(region).jurisdiction}); allowed regions: {allowed}",
            rule=rule,
            region=region,
            allowed=[r.id for r in REGIONS if r.jurisdiction == rule],
        )


def backup_region_of(
    region: str, overrides: Mapping[str, str] | None = None, server: str | None = None
) -> str:
    """The region a server (named `server`, in `region`) keeps its backups
    in: its own override, its region's, else the paired region."""
    if overrides and server is not None and server in overrides:
        return overrides[server]
    if overrides and region in overrides:
        return overrides[region]
    return BACKUP_PAIRS[region]


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
    # Client connections each router accepts for the project (all its roles
    # together); past it a login is refused at once. At least the pool.
    router_clients: int = 100
    # Backups: how far back a point-in-time restore reaches (and how long a
    # deleted project stays restorable), and the project's snapshots: one
    # every `snapshot_every_h` hours (0: only on request), the newest
    # `snapshot_keep` kept, none older than `snapshot_max_age_days`.
    pitr_days: int = 7
    snapshot_every_h: int = 0
    snapshot_keep: int = 3
    snapshot_max_age_days: int = 7


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
        router_clients=500,
        pitr_days=14,
        snapshot_every_h=24,
        snapshot_keep=7,
        snapshot_max_age_days=14,
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
        router_clients=2000,
        pitr_days=30,
        snapshot_every_h=24,
        snapshot_keep=30,
        snapshot_max_age_days=30,
    ),
)


def check_plans(plans: Sequence[Plan]) -> None:
    """Refuse retention settings that make no sense (at start)."""
    for p in plans:
        if p.router_clients < p.router_pool_size:
            raise ValueError(
                f"plan {p.id}: router_clients ({p.router_clients}) must be at least "
                f"router_pool_size ({p.router_pool_size})"
            )
        if p.pitr_days < 1:
            raise ValueError(f"plan {p.id}: pitr_days must be at least 1, not {p.pitr_days}")
        if p.snapshot_keep < 1:
            raise ValueError(
                f"plan {p.id}: snapshot_keep must be at least 1, not {p.snapshot_keep}"
            )
        if p.snapshot_max_age_days < 1:
            raise ValueError(
                f"plan {p.id}: snapshot_max_age_days must be at least 1, "
                f"not {p.snapshot_max_age_days}"
            )
        if p.snapshot_every_h < 0:
            raise ValueError(
                f"plan {p.id}: snapshot_every_h must be 0 (none) or more, not {p.snapshot_every_h}"
            )
        if p.snapshot_every_h and p.snapshot_every_h > p.snapshot_max_age_days * 24:
            raise ValueError(
                f"plan {p.id}: a snapshot every {p.snapshot_every_h} h outlives its maximum "
                f"age of {p.snapshot_max_age_days} days"
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
    residency: str | None = None,
) -> Placement:
    """Decide which server hosts a new project.

    - regional: a server in the requested region; a metadata-only region
      (no server) falls back to the default region.
    - hybrid: the free plan goes to the default region's primary server, paid
      plans to their requested region (with the same fallback).
    - single: everything on the default region's primary server.
    Within the chosen region the least-loaded server with capacity wins.

    With a residency rule the database never leaves its jurisdiction: the
    requested region must be in it, and a metadata-only region falls back to
    a served region of the same jurisdiction, never to the default region
    elsewhere (ResidencyViolation, 409, when there is none).
    """
    get_region(region)
    plan_info = get_plan(plan)
    enabled = [s for s in servers if s.enabled]
    require_residency(residency, region, what="its region")

    if policy is PlacementPolicy.SINGLE or (
        policy is PlacementPolicy.HYBRID and not plan_info.paid
    ):
        why = "single-server policy" if policy is PlacementPolicy.SINGLE else "free plan"
        require_residency(residency, default_region, what=f"its database ({why})")
        return _primary_of(enabled, default_region, reason=f"{why}: primary of {default_region}")

    target = region
    reason = f"requested region {region}"
    served = served_regions(enabled)
    if region not in served:
        target = default_region
        if not residency_allows(residency, default_region):
            inside = [r.id for r in REGIONS if r.id in served and r.jurisdiction == residency]
            if not inside:
                raise ResidencyViolation(
                    f"the project's residency rule is {residency!r} and {region} is "
                    f"metadata-only, but no {residency} region has a server; served regions: "
                    f"{', '.join(sorted(served))}",
                    rule=residency,
                    region=region,
                )
            target = inside[0]
        reason = f"{region} is metadata-only; hosted in {target}"
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
