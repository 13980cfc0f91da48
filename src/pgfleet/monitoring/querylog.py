"""Query logs: one row per statement run through pgfleet, written in batches
off the query path.

`QueryLogWriter.log()` only appends to an in-memory queue (microseconds); a
background thread COPYs batches into the partitioned `query_logs` table and
adds them to the hourly rollups in the same transaction. Parameter
values are never logged: only a fingerprint of the statement's shape.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from pgfleet.errors import PlatformUnavailable
from pgfleet.monitoring import histogram
from pgfleet.platform.core import Platform
from pgfleet.pooling import ConnectionSource

log = logging.getLogger(__name__)


def storable(text: str) -> str:
    """`text` as PostgreSQL can store it: NUL and lone surrogates (which a
    client's JSON can carry into a statement) escaped."""
    if "\x00" not in text:
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
    return text.replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class QueryLogRecord:
    tenant_id: uuid.UUID
    region: str
    hosted_region: str
    server_id: int
    route: str
    execution_time_ms: float
    row_count: int | None
    outcome: str
    fingerprint: str
    executed_at: datetime


_COLUMNS = (
    "tenant_id",
    "region",
    "hosted_region",
    "server_id",
    "route",
    "execution_time_ms",
    "row_count",
    "outcome",
    "fingerprint",
    "executed_at",
)


def partition_name(day: date) -> str:
    return f"query_logs_p{day:%Y%m%d}"


def ensure_partition(conn: psycopg.Connection[Any], day: date) -> bool:
    """Create the day's partition if missing. False if it cannot be made
    because rows for that day already sit in the default partition."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} PARTITION OF query_logs "
                    "FOR VALUES FROM ({}) TO ({})"
                ).format(
                    sql.Identifier(partition_name(day)),
                    sql.Literal(start),
                    sql.Literal(start + timedelta(days=1)),
                )
            )
        return True
    except (psycopg.errors.DuplicateTable, psycopg.errors.UniqueViolation):
        return True  # made concurrently by another process
    except psycopg.errors.CheckViolation:
        return False


def apply_retention(conn: psycopg.Connection[Any], retention_days: int) -> int:
    """Drop whole day partitions past retention; trim the default partition and
    rollups. Returns the number of partitions dropped."""
    cutoff = (datetime.now(UTC) - timedelta(days=retention_days)).date()
    names = [
        r[0]
        for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'query_logs'::regclass AND c.relname ~ '^query_logs_p[0-9]{8}$'"
        )
    ]
    dropped = 0
    for name in names:
        day = datetime.strptime(name[-8:], "%Y%m%d").date()
        if day < cutoff:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
            dropped += 1
    conn.execute(
        "DELETE FROM query_logs_default WHERE executed_at < %s::date", (cutoff.isoformat(),)
    )
    conn.execute("DELETE FROM query_log_rollups WHERE bucket < %s::date", (cutoff.isoformat(),))
    conn.commit()
    return dropped


def write_batch(conn: psycopg.Connection[Any], records: list[QueryLogRecord]) -> None:
    """COPY the records and fold them into the rollups, in one transaction."""
    rollups: dict[tuple[datetime, str, str, str], list[Any]] = defaultdict(
        lambda: [0, 0, 0.0, histogram.empty()]
    )
    for r in records:
        hour = r.executed_at.replace(minute=0, second=0, microsecond=0)
        agg = rollups[(hour, r.region, r.hosted_region, r.route)]
        agg[0] += 1
        agg[1] += r.outcome != "ok"
        agg[2] += r.execution_time_ms
        agg[3][histogram.bucket_of(r.execution_time_ms)] += 1
    with conn.transaction():
        with conn.cursor().copy(
            sql.SQL("COPY query_logs ({}) FROM STDIN").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS)
            )
        ) as copy:
            for r in records:
                copy.write_row(
                    (
                        r.tenant_id,
                        r.region,
                        r.hosted_region,
                        r.server_id,
                        r.route,
                        r.execution_time_ms,
                        r.row_count,
                        r.outcome,
                        r.fingerprint,
                        r.executed_at,
                    )
                )
        # Sorted, so concurrent writers lock rollup rows in the same order.
        for key in sorted(rollups):
            count, errors, sum_ms, hist = rollups[key]
            conn.execute(
                """
                INSERT INTO query_log_rollups AS r
                  (bucket, region, hosted_region, route, count, errors, sum_ms, hist)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (bucket, region, hosted_region, route) DO UPDATE SET
                  count = r.count + EXCLUDED.count, errors = r.errors + EXCLUDED.errors,
                  sum_ms = r.sum_ms + EXCLUDED.sum_ms,
                  hist = pgfleet_hist_add(r.hist, EXCLUDED.hist)
                """,
                (*key, count, errors, sum_ms, hist),
            )


class QueryLogWriter:
    """Writes query_logs rows in batches from a thread, so a statement never
    waits for its log. One per Platform: `QueryLogWriter.of(platform)`."""

    @classmethod
    def of(cls, platform: Platform) -> QueryLogWriter:
        def make() -> QueryLogWriter:
            writer = cls(platform.db)
            platform.metrics.add_state(
                lambda: {"pgfleet_query_log_queue": [({}, float(writer.pending()))]}
            )
            return writer

        return platform.component("query_log", make, close=cls.close)

    def __init__(
        self, pool: ConnectionSource, *, flush_interval_s: float = 0.2, max_batch: int = 5000
    ) -> None:
        self.pool = pool
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[QueryLogRecord] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._days: set[date] = set()
        self._thread: threading.Thread | None = None
        self.written = 0
        self.retried = 0

    def pending(self) -> int:
        return self._queue.qsize()

    def log(self, record: QueryLogRecord) -> None:
        fp = storable(record.fingerprint)
        if fp is not record.fingerprint:
            record = dataclasses.replace(record, fingerprint=fp)
        self._queue.put_nowait(record)
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._flush_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pgfleet-querylog", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
                if failing:
                    log.warning("query logs are written again")
                failing = False
            except (psycopg.Error, PlatformUnavailable) as e:
                if not failing:  # once per outage, not five times a second
                    log.warning("query logs kept in memory until the platform DB answers: %s", e)
                failing = True
            except Exception:
                log.exception("query log flush failed; will retry")

    def flush(self) -> int:
        """Write everything queued so far. Returns the number of rows written."""
        with self._flush_lock:
            total = 0
            while True:
                batch: list[QueryLogRecord] = []
                while len(batch) < self.max_batch:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if not batch:
                    return total
                self._write(batch)
                total += len(batch)

    def _write(self, batch: list[QueryLogRecord]) -> None:
        try:
            with self.pool.connection() as conn:
                for day in {r.executed_at.astimezone(UTC).date() for r in batch} - self._days:
                    if ensure_partition(conn, day):
                        self._days.add(day)
                try:
                    write_batch(conn, batch)
                except psycopg.DataError:
                    # A row the table refuses must not hold up every other
                    # (nor come back forever): write them one by one.
                    self._write_each(conn, batch)
                    return
            self.written += len(batch)
        except (psycopg.Error, PlatformUnavailable):
            # The platform DB is unreachable: keep the rows for the next try,
            # but never grow without bound.
            self.retried += len(batch)
            if self._queue.qsize() < 100_000:
                for r in batch:
                    self._queue.put_nowait(r)
            raise

    def _write_each(self, conn: psycopg.Connection[Any], batch: list[QueryLogRecord]) -> None:
        for r in batch:
            try:
                write_batch(conn, [r])
                self.written += 1
            except psycopg.DataError as e:
                log.warning("a query log row was dropped: %s", e.__class__.__name__)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.flush()
        except (psycopg.Error, PlatformUnavailable):
            log.warning("query logs not written at shutdown: platform DB unreachable")
