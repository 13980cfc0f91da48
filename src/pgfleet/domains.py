"""The domains pgfleet runs, wired into a process (the edges call this).

Importing this module registers the domains' operation kinds, jobs and
periodic work with the engine (pgfleet.operations.registry); `attach()` adds
their per-platform parts. The engine and the platform know no domain; this
is the one place that knows them all.
"""

from __future__ import annotations

from pgfleet.backups import archives as backup_archives
from pgfleet.backups import kinds as backup_kinds
from pgfleet.backups import service as backup_service
from pgfleet.monitoring import health
from pgfleet.platform.core import Platform
from pgfleet.tenants import kinds, reconcile, routing, spares

# What registered itself on import (kept, so the imports are not unused).
LOADED = (kinds, reconcile, routing, spares, backup_kinds, backup_archives, backup_service)


def attach(platform: Platform) -> Platform:
    """The domains' parts of a platform: server health, spares and WAL
    archiving in /metrics."""
    health.install_gauges(platform)
    spares.install_gauges(platform)
    backup_archives.install_gauges(platform)
    return platform
