"""The rules backups follow, as pure functions: what retention keeps, when a
base backup or snapshot is due, which settings are refused, residency."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from pgfleet.backups.retention import (
    Kept,
    base_backup_due,
    check_plans,
    pitr_floor,
    snapshot_due,
    snapshots_to_delete,
)
from pgfleet.config import Settings
from pgfleet.errors import InvalidInput, ResidencyViolation
from pgfleet.regions import (
    BACKUP_PAIRS,
    PLANS,
    REGIONS,
    PlacementPolicy,
    ServerLoad,
    backup_region_of,
    check_residency_rule,
    choose_server,
    get_plan,
    require_residency,
)

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def snaps(*ages_h: float) -> list[Kept]:
    return [Kept(f"s{i}", NOW - timedelta(hours=h)) for i, h in enumerate(ages_h)]


def ids(kept: list[Kept]) -> list[str]:
    return sorted(k.id for k in kept)


def test_snapshots_beyond_the_count_go_oldest_first() -> None:
    doomed = snapshots_to_delete(
        snaps(1, 5, 2, 30, 10), keep=3, max_age=timedelta(days=30), now=NOW
    )
    assert ids(doomed) == ["s3", "s4"]  # 30 h and 10 h old: the two oldest


def test_snapshots_older_than_the_maximum_age_go() -> None:
    doomed = snapshots_to_delete(snaps(1, 50, 200), keep=10, max_age=timedelta(days=2), now=NOW)
    assert ids(doomed) == ["s1", "s2"]


def test_the_newest_snapshot_is_kept_whatever_its_age() -> None:
    assert snapshots_to_delete(snaps(500), keep=1, max_age=timedelta(days=1), now=NOW) == []
    doomed = snapshots_to_delete(snaps(900, 500), keep=1, max_age=timedelta(days=1), now=NOW)
    assert ids(doomed) == ["s0"]


def test_no_snapshots_nothing_to_delete_and_keep_must_be_positive() -> None:
    assert snapshots_to_delete([], keep=1, max_age=timedelta(days=1), now=NOW) == []
    with pytest.raises(ValueError, match="keep must be at least 1"):
        snapshots_to_delete(snaps(1), keep=0, max_age=timedelta(days=1), now=NOW)


def test_snapshot_schedule() -> None:
    every = timedelta(hours=24)
    assert snapshot_due(None, every=every, now=NOW)
    assert snapshot_due(NOW - timedelta(hours=25), every=every, now=NOW)
    assert not snapshot_due(NOW - timedelta(hours=1), every=every, now=NOW)
    assert not snapshot_due(None, every=None, now=NOW)


def test_base_backup_schedule() -> None:
    week, day = timedelta(days=7), timedelta(days=1)

    def due(full_h: float | None, any_h: float | None) -> str | None:
        return base_backup_due(
            last_full=None if full_h is None else NOW - timedelta(hours=full_h),
            last_any=None if any_h is None else NOW - timedelta(hours=any_h),
            full_every=week,
            diff_every=day,
            now=NOW,
        )

    assert due(None, None) == "full"
    assert due(24 * 8, 1) == "full"  # the full one is too old, whatever came since
    assert due(48, 25) == "diff"
    assert due(48, 2) is None


def test_the_point_in_time_floor_follows_the_plan() -> None:
    assert pitr_floor(get_plan("free"), NOW) == NOW - timedelta(days=7)
    assert pitr_floor(get_plan("pro"), NOW) == NOW - timedelta(days=14)
    assert pitr_floor(get_plan("enterprise"), NOW) == NOW - timedelta(days=30)


def test_invalid_retention_is_refused_with_what_is_wrong() -> None:
    check_plans(PLANS)
    free = get_plan("free")
    for bad, message in (
        (replace(free, pitr_days=0), "pitr_days must be at least 1"),
        (replace(free, snapshot_keep=0), "snapshot_keep must be at least 1"),
        (replace(free, snapshot_max_age_days=0), "snapshot_max_age_days must be at least 1"),
        (replace(free, snapshot_every_h=24 * 9, snapshot_max_age_days=7), "outlives"),
    ):
        with pytest.raises(ValueError, match=message):
            check_plans([bad])


def test_invalid_backup_settings_are_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="backup_regions: unknown region 'mars-1'"):
        Settings(backup_regions={"us-east-1": "mars-1"})
    with pytest.raises(ValidationError, match="must go to another region"):
        Settings(backup_regions={"us-east-1": "us-east-1"})
    with pytest.raises(ValidationError, match="must not exceed"):
        Settings(backup_diff_every_h=200, backup_full_every_h=100)
    with pytest.raises(ValidationError, match="'nowhere-z' is neither a region"):
        Settings(backup_regions={"nowhere-z": "us-west-1"})
    with pytest.raises(ValidationError, match="us-east-1-a's backups must go to another region"):
        Settings(backup_regions={"us-east-1-a": "us-east-1"})
    Settings(backup_regions={"us-east-1-a": "us-west-1"})


def test_every_region_backs_up_into_another_region_of_its_jurisdiction() -> None:
    by_id = {r.id: r for r in REGIONS}
    for r in REGIONS:
        pair = backup_region_of(r.id)
        assert pair != r.id
        assert by_id[pair].jurisdiction == r.jurisdiction
    assert set(BACKUP_PAIRS) == set(by_id)
    assert backup_region_of("us-east-1", {"us-east-1": "eu-west-1"}) == "eu-west-1"
    # A server's own entry wins over its region's.
    both = {"us-east-1": "eu-west-1", "us-east-1-b": "us-west-1"}
    assert backup_region_of("us-east-1", both, "us-east-1-b") == "us-west-1"
    assert backup_region_of("us-east-1", both, "us-east-1-a") == "eu-west-1"


def servers() -> list[ServerLoad]:
    return [
        ServerLoad(1, "us-east-1-a", "us-east-1", 100, 0, True),
        ServerLoad(2, "eu-central-1-a", "eu-central-1", 100, 0, True),
    ]


def test_residency_places_a_metadata_only_region_inside_its_jurisdiction() -> None:
    p = choose_server(
        policy=PlacementPolicy.REGIONAL,
        region="eu-west-1",
        plan="free",
        servers=servers(),
        residency="eu",
    )
    assert p.hosted_region == "eu-central-1"
    # Without a rule the seed's fallback (the default region) holds.
    p = choose_server(
        policy=PlacementPolicy.REGIONAL, region="eu-west-1", plan="free", servers=servers()
    )
    assert p.hosted_region == "us-east-1"


def test_residency_refuses_what_would_leave_the_jurisdiction() -> None:
    with pytest.raises(ResidencyViolation, match="no apac region has a server"):
        choose_server(
            policy=PlacementPolicy.REGIONAL,
            region="ap-northeast-1",
            plan="free",
            servers=servers(),
            residency="apac",
        )
    with pytest.raises(ResidencyViolation, match="cannot be in us-east-1"):
        choose_server(
            policy=PlacementPolicy.REGIONAL,
            region="us-east-1",
            plan="free",
            servers=servers(),
            residency="eu",
        )
    # The single-server policy would put an EU project in us-east-1: refused.
    with pytest.raises(ResidencyViolation):
        choose_server(
            policy=PlacementPolicy.SINGLE,
            region="eu-central-1",
            plan="free",
            servers=servers(),
            residency="eu",
        )
    with pytest.raises(InvalidInput, match="unknown residency rule 'mars'"):
        check_residency_rule("mars")
    require_residency(None, "ap-southeast-1", what="anything")
