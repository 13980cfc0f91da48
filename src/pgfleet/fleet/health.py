"""Probing a regional server: reachability, round trip, version, load."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import psycopg

from pgfleet.fleet.registry import ServerRecord


@dataclass(frozen=True)
class ServerHealth:
    name: str
    region: str
    ok: bool
    latency_ms: float | None
    version: str | None
    error: str | None
    server_id: int = 0
    connections_used: int | None = None
    connections_max: int | None = None
    databases: int | None = None
    tenant_databases: int | None = None
    bytes_used: int | None = None
    spares_ready: int | None = None
    # WAL archiving (pg_stat_archiver): off, or on and how it goes. Not kept
    # in the history; /health shows it live.
    archive_mode: str | None = None
    archive_failing: bool = False
    last_archived_at: datetime | None = None
    # WAL written since the end of the newest archived segment (bytes): what
    # the archive would not have if the server's disk died now.
    archive_lag_bytes: int | None = None


def check_server(server: ServerRecord, timeout_s: float = 2.0) -> ServerHealth:
    """Reachability, round trip, version, connections used / max, database
    count and disk used by databases."""
    start = time.perf_counter()
    try:
        with psycopg.connect(**server.admin_conninfo(timeout_s), autocommit=True) as conn:
            latency = round((time.perf_counter() - start) * 1000, 2)
            row = conn.execute(
                """
                WITH dbs AS (
                  -- prepared spares (tenants/spares.py): marked so, owned by a
                  -- role that cannot log in (a tenant may comment its own
                  -- database, but not take LOGIN from its own role); they are
                  -- named like projects
                  SELECT d.datname,
                         shobj_description(d.oid, 'pg_database') IS NOT DISTINCT FROM
                             'pgfleet: prepared spare, ready'
                           AND NOT (SELECT rolcanlogin FROM pg_roles WHERE oid = d.datdba)
                           AS spare
                  FROM pg_database d
                )
                SELECT current_setting('server_version'),
                       (SELECT count(*) FROM pg_stat_activity
                        WHERE backend_type = 'client backend'),
                       current_setting('max_connections')::int,
                       (SELECT count(*) FROM pg_database WHERE NOT datistemplate),
                       (SELECT count(*) FROM dbs WHERE datname LIKE 'tenant\\_%' AND NOT spare),
                       (SELECT sum(pg_database_size(oid)) FROM pg_database
                        WHERE datconnlimit <> -2)::bigint,
                       (SELECT count(*) FROM dbs WHERE spare),
                       current_setting('archive_mode'),
                       a.last_archived_time,
                       coalesce(a.last_failed_time > coalesce(a.last_archived_time, '-infinity'),
                                false),
                       a.last_archived_wal,
                       pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
                       (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')
                FROM pg_stat_archiver a
                """
            ).fetchone()
        assert row is not None
        return ServerHealth(
            server.name,
            server.region,
            True,
            latency,
            row[0],
            None,
            server.id,
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            archive_mode=row[7],
            last_archived_at=row[8],
            archive_failing=bool(row[9]),
            archive_lag_bytes=_archive_lag(row[7], row[10], row[11], row[12]),
        )
    except psycopg.Error as e:
        # Only the class of failure: messages can carry hosts and user names.
        reason = "unreachable" if isinstance(e, psycopg.OperationalError) else "error"
        return ServerHealth(server.name, server.region, False, None, None, reason, server.id)


def _archive_lag(mode: str, last_wal: str | None, position: int, segment: int) -> int | None:
    """Bytes of WAL past the end of the newest archived segment (its name
    is timeline, log and segment number in hex)."""
    if mode != "on":
        return None
    if not last_wal or len(last_wal) != 24:
        return position
    try:
        log_no, seg_no = int(last_wal[8:16], 16), int(last_wal[16:24], 16)
    except ValueError:
        return None
    end = log_no * 0x1_0000_0000 + (seg_no + 1) * segment
    return max(0, position - end)


def check_all(servers: list[ServerRecord]) -> list[ServerHealth]:
    """Every server checked at once (each within its own timeout)."""
    if not servers:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(servers))) as ex:
        return list(ex.map(check_server, servers))
