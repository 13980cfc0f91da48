"""What to keep and what to take: pure functions of the facts (the backups
that exist, the time, the plan), tested without a server.

Modelled on pghoard's `determine_backups_to_delete`: keep at most N, never
older than the maximum age, but never delete the newest usable one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from pgfleet.regions import Plan, check_plans

__all__ = [
    "Kept",
    "base_backup_due",
    "check_plans",
    "pitr_floor",
    "snapshot_due",
    "snapshots_to_delete",
]


@dataclass(frozen=True)
class Kept:
    """A backup as retention sees it."""

    id: str
    taken_at: datetime


def snapshots_to_delete(
    snapshots: Sequence[Kept], *, keep: int, max_age: timedelta, now: datetime
) -> list[Kept]:
    """The snapshots of one project to delete: beyond the newest `keep`, or
    older than `max_age`, except that the newest one is always kept (a
    project never loses its last snapshot to age alone)."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    ordered = sorted(snapshots, key=lambda s: s.taken_at, reverse=True)
    doomed = []
    for i, snap in enumerate(ordered):
        if i == 0:
            continue
        if i >= keep or now - snap.taken_at > max_age:
            doomed.append(snap)
    return doomed


def snapshot_due(last_taken: datetime | None, *, every: timedelta | None, now: datetime) -> bool:
    """Is a scheduled snapshot due (`every` None: the plan schedules none)?"""
    if every is None:
        return False
    return last_taken is None or now - last_taken >= every


def base_backup_due(
    *,
    last_full: datetime | None,
    last_any: datetime | None,
    full_every: timedelta,
    diff_every: timedelta,
    now: datetime,
) -> str | None:
    """The base backup a server needs now: `full` when it has none or its
    newest full one is older than `full_every`, `diff` when its newest
    backup of any kind is older than `diff_every`, else None."""
    if last_full is None or now - last_full >= full_every:
        return "full"
    if last_any is None or now - last_any >= diff_every:
        return "diff"
    return None


def pitr_floor(plan: Plan, now: datetime) -> datetime:
    """The earliest moment a project on `plan` may be restored to."""
    return now - timedelta(days=plan.pitr_days)
