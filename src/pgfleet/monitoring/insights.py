"""Query insights for all traffic: what each project's database runs, from
its server's `pg_stat_statements`, whoever the client (psql, an app, the
routers, the SQL API).

One sampling round reads each server's view once, in the server's admin
database (where no tenant ever connects or can create anything), grouped
by database and normalised statement, and writes what changed into
`statement_stats` in the platform DB. It reads a catalog function and
`pg_database`; no tenant object is named or called, so nothing a tenant
planted can run. Statements of superusers (pgfleet's own) are left out, and
utility statements are not tracked at all (`track_utility = off`: they keep
their literals, such as a password).

Counters are cumulative, as the server keeps them: a project's figures run
from its statement's first sample (`first_seen`) to the last
(`sampled_at`)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgfleet.errors import PgfleetError
from pgfleet.fleet.registry import ServerRecord
from pgfleet.platform.core import Platform

log = logging.getLogger(__name__)

EXTENSION = "pg_stat_statements"
# A statement's text as stored: long ones are cut, on the server.
MAX_QUERY_CHARS = 2000
# A read of a server is cut off after this: a server that stalls, or whose
# texts a tenant made huge, costs a round this much at most.
READ_TIMEOUT_S = 10
# What the server no longer has (evicted, reset, a database gone) is marked
# gone, not deleted: a tenant flooding the server's shared capacity (10,000
# statements) must not wipe another project's figures. Gone rows go after
# KEEP_GONE_DAYS, and a project keeps at most MAX_PER_PROJECT rows (its live
# ones first), so a flood is bounded in the platform DB too.
KEEP_GONE_DAYS = 7
MAX_PER_PROJECT = 500

# Counters only (no texts): cheap, whatever the texts weigh.
_COUNTERS = r"""
SELECT d.datname, s.queryid, sum(s.calls)::bigint AS calls,
       sum(s.total_exec_time) AS total_ms, sum(s.rows)::bigint AS rows,
       sum(s.shared_blks_hit)::bigint AS hit, sum(s.shared_blks_read)::bigint AS read
FROM {fn}(false) s
JOIN pg_catalog.pg_database d ON d.oid = s.dbid
LEFT JOIN pg_catalog.pg_roles r ON r.oid = s.userid
WHERE d.datname LIKE 'tenant\_%%' AND s.queryid IS NOT NULL
  AND NOT coalesce(r.rolsuper, false)
GROUP BY d.datname, s.queryid
"""
# Texts, of the statements pgfleet has not stored yet. The server reads its
# whole texts file for it, which a tenant can make large: a failure (the
# timeout) costs only the new statements this round.
_TEXTS = """
SELECT DISTINCT ON (d.datname, s.queryid) d.datname, s.queryid, left(s.query, %s) AS query
FROM {fn}(true) s JOIN pg_catalog.pg_database d ON d.oid = s.dbid
WHERE s.queryid = ANY(%s) AND d.datname = ANY(%s)
"""

_UPSERT = """
INSERT INTO statement_stats AS st
    (tenant_id, queryid, query, calls, total_ms, rows, shared_blks_hit, shared_blks_read,
     sampled_at)
SELECT s.tenant_id, s.queryid, coalesce(s.query, ''), s.calls, s.total_ms, s.rows, s.hit,
       s.read, now()
FROM statement_sample s
JOIN tenants t ON t.id = s.tenant_id AND t.server_id = %s
WHERE s.query IS NOT NULL OR EXISTS (
    SELECT 1 FROM statement_stats k WHERE k.tenant_id = s.tenant_id AND k.queryid = s.queryid)
ON CONFLICT (tenant_id, queryid) DO UPDATE SET
    calls = EXCLUDED.calls, total_ms = EXCLUDED.total_ms,
    rows = EXCLUDED.rows, shared_blks_hit = EXCLUDED.shared_blks_hit,
    shared_blks_read = EXCLUDED.shared_blks_read, sampled_at = EXCLUDED.sampled_at,
    gone_at = NULL
WHERE st.calls IS DISTINCT FROM EXCLUDED.calls
   OR st.shared_blks_read IS DISTINCT FROM EXCLUDED.shared_blks_read
   OR st.gone_at IS NOT NULL
"""
_GONE = """
UPDATE statement_stats st SET gone_at = now() FROM tenants t
WHERE t.id = st.tenant_id AND t.server_id = %s AND st.gone_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM statement_sample s
                  WHERE s.tenant_id = st.tenant_id AND s.queryid = st.queryid)
"""
_EXPIRE = """
DELETE FROM statement_stats st USING tenants t
WHERE t.id = st.tenant_id AND t.server_id = %s
  AND st.gone_at < now() - make_interval(days => %s)
"""
_CAP = """
DELETE FROM statement_stats st USING (
    SELECT x.tenant_id, x.queryid, row_number() OVER (
        PARTITION BY x.tenant_id ORDER BY x.gone_at IS NOT NULL, x.total_ms DESC, x.queryid
    ) AS n
    FROM statement_stats x JOIN tenants t ON t.id = x.tenant_id AND t.server_id = %s
) r
WHERE r.tenant_id = st.tenant_id AND r.queryid = st.queryid AND r.n > %s
"""

# A project's database, as tenants.naming spells it (this layer cannot import
# it): exactly one spelling per project, so two databases never map to one.
_DATABASE = re.compile(
    r"^tenant_([0-9a-f]{8})_([0-9a-f]{4})_([0-9a-f]{4})_([0-9a-f]{4})_([0-9a-f]{12})$"
)


def _tenant_id(datname: str) -> uuid.UUID | None:
    m = _DATABASE.match(datname)
    return uuid.UUID("-".join(m.groups())) if m else None


class UtilityTracked(PgfleetError):
    """The server tracks utility statements, whose texts keep their literals."""


@dataclass
class Read:
    """One server's statements: counters of all, texts of the new ones."""

    rows: list[dict[str, Any]]
    texts: dict[tuple[str, int], str]
    texts_error: str | None = None


def _known(platform: Platform, server: ServerRecord) -> set[tuple[uuid.UUID, int]]:
    with platform.db.connection() as conn:
        return {
            (r[0], r[1])
            for r in conn.execute(
                "SELECT st.tenant_id, st.queryid FROM statement_stats st "
                "JOIN tenants t ON t.id = st.tenant_id WHERE t.server_id = %s",
                (server.id,),
            )
        }


def _timed(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "SELECT pg_catalog.set_config('statement_timeout', %s, true)", (f"{READ_TIMEOUT_S}s",)
    )


def read_server(platform: Platform, server: ServerRecord) -> Read | None:
    """The server's statements per tenant database, or None when it does
    not have pg_stat_statements (an external server without it, or a build
    without the module)."""
    with (
        platform.servers.admin_connection(server) as conn,
        conn.cursor(row_factory=dict_row) as cur,
    ):
        row = cur.execute(
            "SELECT n.nspname FROM pg_catalog.pg_extension e "
            "JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = %s",
            (EXTENSION,),
        ).fetchone()
        if row is None:
            return None
        utility = cur.execute(
            "SELECT current_setting('pg_stat_statements.track_utility', true) AS on"
        ).fetchone()
        if utility is not None and utility["on"] not in (None, "off"):
            # Utility statements keep their literals: a tenant's ALTER ROLE
            # ... PASSWORD would be copied out as typed.
            raise UtilityTracked(
                f"pg_stat_statements.track_utility is on at server {server.name}: "
                "utility statements keep their literals (a password in ALTER ROLE), so "
                "its statements are not sampled; set it off"
            )
        fn = sql.Identifier(row["nspname"], EXTENSION)
        try:
            with conn.transaction():
                _timed(conn)
                rows = cur.execute(sql.SQL(_COUNTERS).format(fn=fn), prepare=False).fetchall()
        except psycopg.errors.ObjectNotInPrerequisiteState:
            # The extension exists but the library is not preloaded.
            return None
        known = _known(platform, server)
        new = [
            r
            for r in rows
            if (tid := _tenant_id(r["datname"])) and (tid, r["queryid"]) not in known
        ]
        out = Read(rows, {})
        if new:
            try:
                with conn.transaction():
                    _timed(conn)
                    for t in cur.execute(
                        sql.SQL(_TEXTS).format(fn=fn),
                        (
                            MAX_QUERY_CHARS,
                            list({r["queryid"] for r in new}),
                            list({r["datname"] for r in new}),
                        ),
                        prepare=False,
                    ):
                        out.texts[(t["datname"], t["queryid"])] = t["query"]
            except psycopg.errors.QueryCanceled:
                out.texts_error = (
                    f"the texts of {len(new)} new statement(s) on server {server.name} could "
                    f"not be read within {READ_TIMEOUT_S} s (the server's statement texts are "
                    "very large); their figures come once they can be"
                )
            except psycopg.Error as e:
                if conn.broken:
                    raise
                out.texts_error = f"the texts of new statements were not read: {e}"
        return out


def sample_server(platform: Platform, server: ServerRecord) -> dict[str, Any]:
    """One server's round: read, then write what changed. Returns what it
    did (and records it in statement_samples)."""
    t0 = time.perf_counter()
    error = None
    got: Read | None = None
    changed = 0
    try:
        got = read_server(platform, server)
        if got is None:
            error = f"{EXTENSION} is not loaded on server {server.name}"
        else:
            error = got.texts_error
    except (PgfleetError, psycopg.Error) as e:
        error = str(e)
    rows = got.rows if got is not None else []
    with platform.db.connection() as conn, conn.transaction():
        if got is not None:
            conn.execute(
                "CREATE TEMP TABLE statement_sample (tenant_id uuid, queryid bigint, "
                "query text, calls bigint, total_ms float8, rows bigint, hit bigint, "
                "read bigint) ON COMMIT DROP"
            )
            with conn.cursor().copy(
                "COPY statement_sample (tenant_id, queryid, query, calls, total_ms, rows, "
                "hit, read) FROM STDIN"
            ) as copy:
                for r in rows:
                    tid = _tenant_id(r["datname"])
                    if tid is None:
                        continue
                    copy.write_row(
                        (
                            tid,
                            r["queryid"],
                            got.texts.get((r["datname"], r["queryid"])),
                            r["calls"],
                            r["total_ms"],
                            r["rows"],
                            r["hit"],
                            r["read"],
                        )
                    )
            changed = conn.execute(_UPSERT, (server.id,)).rowcount
            conn.execute(_GONE, (server.id,))
            conn.execute(_EXPIRE, (server.id, KEEP_GONE_DAYS))
            conn.execute(_CAP, (server.id, MAX_PER_PROJECT))
        took = (time.perf_counter() - t0) * 1000
        conn.execute(
            "INSERT INTO statement_samples AS s (server_id, sampled_at, duration_ms, "
            "statements, changed, error) VALUES (%s, now(), %s, %s, %s, %s) "
            "ON CONFLICT (server_id) DO UPDATE SET sampled_at = EXCLUDED.sampled_at, "
            "duration_ms = EXCLUDED.duration_ms, statements = EXCLUDED.statements, "
            "changed = EXCLUDED.changed, error = EXCLUDED.error",
            (server.id, took, len(rows), changed, error),
        )
    return {
        "server": server.name,
        "statements": len(rows),
        "changed": changed,
        "duration_ms": round(took, 1),
        "error": error,
    }


def sample(
    platform: Platform, *, due_only: bool = False, skip: frozenset[int] = frozenset()
) -> list[dict[str, Any]]:
    """A round over every enabled server (with `due_only`, those not sampled
    within PGFLEET_INSIGHTS_INTERVAL_S; never those in `skip`, such as the
    servers that just failed their health check)."""
    servers = platform.servers.all(enabled_only=True)
    if due_only:
        with platform.db.connection() as conn:
            recent = {
                r[0]
                for r in conn.execute(
                    "SELECT server_id FROM statement_samples "
                    "WHERE sampled_at > now() - make_interval(secs => %s)",
                    (platform.settings.insights_interval_s,),
                )
            }
        servers = [s for s in servers if s.id not in recent]
    if skip:
        servers = [s for s in servers if s.id not in skip]
    done = []
    for server in servers:
        try:
            done.append(sample_server(platform, server))
        except Exception:
            log.exception("sampling the statements of server %s failed", server.name)
    return done


def project_statements(
    platform: Platform, tenant_id: uuid.UUID, *, limit: int = 20
) -> dict[str, Any]:
    """A project's statements from every client, the most time-consuming
    first, labelled by their source."""
    with platform.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT query, calls, total_ms, rows, shared_blks_hit, shared_blks_read, "
            "first_seen, sampled_at, gone_at FROM statement_stats WHERE tenant_id = %s "
            "ORDER BY gone_at IS NOT NULL, total_ms DESC, queryid LIMIT %s",
            (tenant_id, limit),
        ).fetchall()
        sampled = cur.execute(
            "SELECT s.sampled_at, s.error FROM statement_samples s "
            "JOIN tenants t ON t.server_id = s.server_id WHERE t.id = %s",
            (tenant_id,),
        ).fetchone()
    if sampled is None:
        available, note = False, "the project's server has not been sampled yet"
    else:
        available, note = sampled["error"] is None, sampled["error"]
    return {
        "source": "pg_stat_statements",
        "clients": "all (psql, apps, the routers and the SQL API)",
        "since": min((r["first_seen"] for r in rows), default=None),
        "sampled_at": sampled["sampled_at"] if sampled else None,
        "available": available,
        "note": note,
        "statements": [_statement(r) for r in rows],
    }


def _statement(r: dict[str, Any]) -> dict[str, Any]:
    blocks = r["shared_blks_hit"] + r["shared_blks_read"]
    return {
        "query": r["query"],
        "calls": r["calls"],
        "total_ms": round(r["total_ms"], 3),
        "mean_ms": round(r["total_ms"] / r["calls"], 3) if r["calls"] else None,
        "rows": r["rows"],
        "shared_blks_hit": r["shared_blks_hit"],
        "shared_blks_read": r["shared_blks_read"],
        "cache_hit_ratio": round(r["shared_blks_hit"] / blocks, 4) if blocks else None,
        "gone_at": r["gone_at"],
    }


def region_statements(platform: Platform) -> list[dict[str, Any]]:
    """Per hosting region, all clients' statements together (cumulative)."""
    with platform.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT t.hosted_region AS region, count(DISTINCT t.id) AS projects, "
            "sum(st.calls)::bigint AS calls, sum(st.total_ms) AS total_ms, "
            "min(st.first_seen) AS since FROM statement_stats st "
            "JOIN tenants t ON t.id = st.tenant_id WHERE t.status <> 'deleted' "
            "GROUP BY t.hosted_region ORDER BY t.hosted_region"
        ).fetchall()
    return [
        {
            "region": r["region"],
            "source": "pg_stat_statements",
            "projects": r["projects"],
            "calls": r["calls"],
            "total_ms": round(r["total_ms"], 3),
            "mean_ms": round(r["total_ms"] / r["calls"], 3) if r["calls"] else None,
            "since": r["since"],
        }
        for r in rows
    ]


def last_rounds(platform: Platform) -> list[dict[str, Any]]:
    """Each server's last sampling round: when, how long, how many rows."""
    with platform.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT v.name AS server, s.sampled_at, s.duration_ms, s.statements, s.changed, "
            "s.error FROM statement_samples s JOIN servers v ON v.id = s.server_id "
            "ORDER BY v.name"
        ).fetchall()
