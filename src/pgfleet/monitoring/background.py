"""Periodic work of a control-plane process: server health history, query
insights from each server's pg_stat_statements, query-log partitions and
retention. Several processes may run it; an
advisory lock lets one do each round."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from pgfleet.errors import PlatformUnavailable
from pgfleet.fleet.embedded import EmbeddedFleet
from pgfleet.fleet.health import ServerHealth, check_all
from pgfleet.monitoring import insights
from pgfleet.monitoring.health import record
from pgfleet.monitoring.insights import READ_TIMEOUT_S
from pgfleet.monitoring.querylog import apply_retention, ensure_partition
from pgfleet.platform.core import Platform

log = logging.getLogger(__name__)
_LOCK_KEY = 0x70676D6F6E  # "pgmon"
_INSIGHTS_KEY = 0x7067697374  # "pgist"


def run_once(platform: Platform) -> list[ServerHealth] | None:
    """One round; None if another process holds the lock."""
    with platform.db.connection() as lock_conn:
        got = lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_KEY,)).fetchone()
        lock_conn.commit()
        if not got or not got[0]:
            return None
        try:
            checks = check_all(platform.servers.all(enabled_only=True))
            record(platform, checks)
            with platform.db.connection() as conn:
                today = datetime.now(UTC).date()
                for d in (today, today + timedelta(days=1), today + timedelta(days=2)):
                    ensure_partition(conn, d)
                apply_retention(conn, platform.settings.query_log_retention_days)
            return checks
        finally:
            lock_conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
            lock_conn.commit()


def insights_round(
    platform: Platform, checks: list[ServerHealth] | None = None
) -> list[dict[str, Any]] | None:
    """One query-insights round over the servers due (never one that just
    failed its health check); None if another process holds its lock. Runs
    in a thread of its own: a slow server costs this round, never the
    health checks."""
    down = frozenset(c.server_id for c in checks or [] if not c.ok)
    with platform.db.connection() as lock_conn:
        got = lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (_INSIGHTS_KEY,)).fetchone()
        lock_conn.commit()
        if not got or not got[0]:
            return None
        try:
            return insights.sample(platform, due_only=True, skip=down)
        finally:
            lock_conn.execute("SELECT pg_advisory_unlock(%s)", (_INSIGHTS_KEY,))
            lock_conn.commit()


def renew_certificates(platform: Platform) -> list[str]:
    """Renew the embedded servers' TLS certificates that are about to expire
    (and the CA with them); servers that got one are reloaded."""
    if not platform.settings.embedded:
        return []
    renewed = EmbeddedFleet(platform.settings).renew_certificates()
    if renewed:
        log.warning("renewed the TLS certificates of %s", ", ".join(renewed))
    return renewed


class BackgroundLoop:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgfleet-background", daemon=True)
        self._insights_thread: threading.Thread | None = None

    def start(self) -> BackgroundLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        last_renewal = 0.0
        failing = False
        while True:
            try:
                checks = run_once(self.platform)
                running = self._insights_thread
                if checks is not None and not (running and running.is_alive()):
                    self._insights_thread = threading.Thread(
                        target=self._insights, args=(checks,), name="pgfleet-insights", daemon=True
                    )
                    self._insights_thread.start()
                if failing:
                    log.warning("background rounds run again")
                failing = False
            except PlatformUnavailable:
                if not failing:  # once per outage
                    log.warning("background round skipped: the platform DB is unreachable")
                failing = True
            except Exception:
                log.exception("background round failed; will retry")
            if time.monotonic() - last_renewal > 3600:
                last_renewal = time.monotonic()
                try:
                    renew_certificates(self.platform)
                except Exception:
                    log.exception("renewing the TLS certificates failed; will retry")
            if self._stop.wait(self.platform.settings.health_interval_s):
                return

    def _insights(self, checks: list[ServerHealth]) -> None:
        try:
            insights_round(self.platform, checks)
        except PlatformUnavailable:
            pass  # the health round says so
        except Exception:
            log.exception("query insights round failed; will retry")

    def stop(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._insights_thread is not None:
            self._insights_thread.join(timeout=READ_TIMEOUT_S + 5)
