"""Platform migrations: the seed's schema exactly, the in-place upgrade of a
pre-region platform DB, and the seed's monitoring SQL."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgfleet.monitoring.seed import REGION_DISTRIBUTION as SEED_REGION_DISTRIBUTION
from pgfleet.monitoring.seed import REGIONAL_PERFORMANCE as SEED_REGIONAL_PERFORMANCE
from pgfleet.platform import migrate
from tests.helpers import FleetUnderTest

SEED_COLUMNS = {
    # name: (data_type, default)
    "id": ("uuid", None),
    "name": ("text", None),
    "subdomain": ("text", None),
    "region": ("text", "'us-east-1'::text"),
    "plan_type": ("text", None),
    "status": ("text", "'active'::text"),
    "connection_info": ("jsonb", None),
    "created_at": ("timestamp with time zone", "now()"),
    "updated_at": ("timestamp with time zone", "now()"),
}


SEED_MIGRATION = """
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS region TEXT DEFAULT 'us-east-1';
CREATE INDEX IF NOT EXISTS tenants_region_idx ON tenants(region);
UPDATE tenants SET region = 'us-east-1' WHERE region IS NULL;
"""


@pytest.fixture
def empty_db(fleet: FleetUnderTest) -> Iterator[dict[str, Any]]:
    name = f"mig_{uuid.uuid4().hex[:10]}"
    with fleet.admin_conn(None) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield fleet.fleet.conninfo(fleet.fleet.platform_server(), name)
    with fleet.admin_conn(None) as c:
        c.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def snapshot(ci: dict[str, Any]) -> tuple[Any, ...]:
    with psycopg.connect(**ci) as c:
        rows = c.execute("SELECT to_jsonb(t) FROM tenants t ORDER BY id").fetchall()
        idx = c.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'tenants' ORDER BY 1"
        ).fetchall()
        cols = c.execute(
            "SELECT column_name, data_type, column_default FROM information_schema.columns "
            "WHERE table_name = 'tenants' ORDER BY column_name"
        ).fetchall()
    return rows, idx, cols


def test_fresh_db_has_the_seed_tenants_table(empty_db: dict[str, Any]) -> None:
    migrate.upgrade(empty_db)
    with psycopg.connect(**empty_db) as c:
        cols = {
            r[0]: (r[1], r[2])
            for r in c.execute(
                "SELECT column_name, data_type, column_default FROM information_schema.columns "
                "WHERE table_name = 'tenants'"
            )
        }
        pk = c.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
            "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = 'tenants'::regclass AND i.indisprimary"
        ).fetchall()
        notnull = c.execute(
            "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'tenants'::regclass "
            "AND attname = 'name'"
        ).fetchone()
        idx = c.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'tenants_region_idx'"
        ).fetchone()
    for name, expected in SEED_COLUMNS.items():
        assert cols[name] == expected, name
    assert pk == [("id",)]
    assert notnull == (True,)
    assert idx is not None and "(region)" in idx[0]
    assert migrate.current(empty_db) == migrate.head()


def test_pre_region_platform_db_is_upgraded_in_place(empty_db: dict[str, Any]) -> None:
    ids = [uuid.uuid4() for _ in range(3)]
    with psycopg.connect(**empty_db) as c:
        # The seed platform before regions: no region column.
        c.execute(
            """
            CREATE TABLE tenants (
              id UUID PRIMARY KEY, name TEXT NOT NULL, subdomain TEXT, plan_type TEXT,
              status TEXT DEFAULT 'active', connection_info JSONB,
              created_at TIMESTAMPTZ DEFAULT NOW(), updated_at TIMESTAMPTZ DEFAULT NOW())
            """
        )
        for i, tid in enumerate(ids):
            c.execute(
                "INSERT INTO tenants (id, name, subdomain, plan_type, connection_info) "
                "VALUES (%s, %s, %s, %s, %s)",
                (
                    tid,
                    f"old tenant {i} ‘quoted’",
                    f"old{i}",
                    "free" if i else "pro",
                    psycopg.types.json.Jsonb({"host": "postgres-primary", "n": i}),
                ),
            )
        before = c.execute(
            "SELECT id, name, subdomain, plan_type, status, connection_info, created_at "
            "FROM tenants ORDER BY id"
        ).fetchall()

    migrate.upgrade(empty_db)

    with psycopg.connect(**empty_db) as c:
        after = c.execute(
            "SELECT id, name, subdomain, plan_type, status, connection_info, created_at "
            "FROM tenants ORDER BY id"
        ).fetchall()
        regions = c.execute("SELECT DISTINCT region FROM tenants").fetchall()
        idx = c.execute(
            "SELECT 1 FROM pg_indexes WHERE indexname = 'tenants_region_idx'"
        ).fetchone()
    assert after == before  # nothing lost or changed
    assert regions == [("us-east-1",)]
    assert idx is not None

    # Running again (ours, then the seed's own SQL) changes nothing.
    first = snapshot(empty_db)
    migrate.upgrade(empty_db)
    with psycopg.connect(**empty_db) as c:
        c.execute(SEED_MIGRATION)
    assert snapshot(empty_db) == first


def test_seed_monitoring_sql_runs_unchanged(empty_db: dict[str, Any]) -> None:
    migrate.upgrade(empty_db)
    t_eu, t_us, t_us2 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(**empty_db) as c:
        for tid, region, plan in (
            (t_eu, "eu-central-1", "pro"),
            (t_us, "us-east-1", "free"),
            (t_us2, "us-east-1", "free"),
        ):
            c.execute(
                "INSERT INTO tenants (id, name, region, plan_type) VALUES (%s, 'x', %s, %s)",
                (tid, region, plan),
            )
        for tid, ms, age in (
            (t_eu, 10.0, "1 hour"),
            (t_eu, 30.0, "2 hours"),
            (t_us, 5.0, "3 hours"),
            (t_us, 100.0, "30 hours"),
        ):
            c.execute(
                "INSERT INTO query_logs (tenant_id, execution_time_ms, executed_at) "
                "VALUES (%s, %s, now() - %s::interval)",
                (tid, ms, age),
            )
        dist = c.execute(SEED_REGION_DISTRIBUTION).fetchall()
        perf = {r[0]: (float(r[1]), r[2]) for r in c.execute(SEED_REGIONAL_PERFORMANCE)}
    assert dist == [("us-east-1", 2, 2, 0), ("eu-central-1", 1, 0, 1)]
    assert perf == {"eu-central-1": (20.0, 2), "us-east-1": (5.0, 1)}


def test_tenant_counts_follow_every_change(empty_db: dict[str, Any]) -> None:
    """The trigger-kept counters always equal a count over tenants."""
    migrate.upgrade(empty_db)
    truth = (
        "SELECT coalesce(region, ''), coalesce(hosted_region, ''), coalesce(server_id, 0), "
        "coalesce(plan_type, ''), coalesce(status, ''), count(*) FROM tenants "
        "GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5"
    )
    kept = (
        "SELECT region, hosted_region, server_id, plan_type, status, n FROM tenant_counts "
        "WHERE n <> 0 ORDER BY 1, 2, 3, 4, 5"
    )
    with psycopg.connect(**empty_db, autocommit=True) as c:
        ids = [uuid.uuid4() for _ in range(30)]
        with c.cursor() as cur:
            cur.executemany(
                "INSERT INTO tenants (id, name, region, plan_type, status, hosted_region) "
                "VALUES (%s, 'x', %s, %s, 'provisioning', %s)",
                [
                    (
                        t,
                        ["us-east-1", "eu-west-1", None][i % 3],
                        ["free", "pro", None][i % 3],
                        "us-east-1",
                    )
                    for i, t in enumerate(ids)
                ],
            )
        assert c.execute(kept).fetchall() == c.execute(truth).fetchall()
        c.execute("UPDATE tenants SET status = 'active' WHERE id = ANY(%s)", (ids[:20],))
        c.execute("UPDATE tenants SET plan_type = 'pro' WHERE id = %s", (ids[0],))
        c.execute("DELETE FROM tenants WHERE id = ANY(%s)", (ids[25:],))
        with c.transaction():
            c.execute("UPDATE tenants SET status = 'deleted' WHERE id = %s", (ids[1],))
            c.execute("UPDATE tenants SET status = 'active' WHERE id = %s", (ids[1],))
        with contextlib.suppress(psycopg.errors.UniqueViolation), c.transaction():
            c.execute("UPDATE tenants SET status = 'paused' WHERE id = %s", (ids[2],))
            c.execute("INSERT INTO tenants (id, name) VALUES (%s, 'dup')", (ids[3],))
        assert c.execute(kept).fetchall() == c.execute(truth).fetchall()
