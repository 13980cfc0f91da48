"""Monitoring: fingerprints, histograms, advisor and costs as pure functions;
query-log partitions and retention, statistics, health history, metrics and
the CLI on the real fleet."""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner, Result

from pgfleet.api.app import create_app
from pgfleet.auth import create_owner
from pgfleet.cli import app as cli_app
from pgfleet.config import get_settings
from pgfleet.errors import InvalidInput
from pgfleet.fleet.embedded import EmbeddedServer
from pgfleet.monitoring import histogram, stats
from pgfleet.monitoring.advisor import AdvisorSettings, RegionCapacity, advise
from pgfleet.monitoring.background import run_once
from pgfleet.monitoring.costs import Prices, estimate
from pgfleet.monitoring.fingerprint import fingerprint
from pgfleet.monitoring.querylog import (
    QueryLogRecord,
    QueryLogWriter,
    apply_retention,
    ensure_partition,
    partition_name,
    write_batch,
)
from pgfleet.monitoring.seed import REGION_DISTRIBUTION as SEED_REGION_DISTRIBUTION
from pgfleet.monitoring.seed import REGIONAL_PERFORMANCE as SEED_REGIONAL_PERFORMANCE
from pgfleet.platform.core import Platform
from tests.helpers import Api, FleetUnderTest

ACTIVE_REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-1")
ALL_REGIONS = (
    "us-east-1",
    "us-west-1",
    "eu-central-1",
    "eu-west-1",
    "ap-southeast-1",
    "ap-northeast-1",
)


# ---- helpers -------------------------------------------------------------------


def percentile_cont(values: Sequence[float], q: float) -> float:
    """PostgreSQL's percentile_cont: linear interpolation between ranks."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def rec(
    tenant_id: uuid.UUID | str,
    region: str,
    route: str,
    ms: float,
    *,
    at: datetime | None = None,
    outcome: str = "ok",
    hosted: str | None = None,
    server_id: int = 1,
    fp: str = "select ?",
) -> QueryLogRecord:
    return QueryLogRecord(
        tenant_id=uuid.UUID(str(tenant_id)),
        region=region,
        hosted_region=hosted or region,
        server_id=server_id,
        route=route,
        execution_time_ms=ms,
        row_count=1,
        outcome=outcome,
        fingerprint=fp,
        executed_at=at or datetime.now(UTC) - timedelta(minutes=2),
    )


def rows_of(platform: Platform, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with platform.db.connection() as conn:
        return conn.execute(query, params).fetchall()


def write(platform: Platform, records: list[QueryLogRecord]) -> None:
    with platform.db.connection() as conn:
        write_batch(conn, records)


def create_ok(api: Api, name: str = "shop", **kw: Any) -> dict[str, Any]:
    r = api.post("/v1/projects", json={"name": name, **kw})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def sql_ok(api: Api, pid: str, query: str, **kw: Any) -> dict[str, Any]:
    r = api.post(f"/v1/projects/{pid}/sql", json={"query": query, **kw})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def get_ok(api: Api, path: str, **params: Any) -> Any:
    r = api.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def restart(fleet: FleetUnderTest, server: EmbeddedServer) -> None:
    """Start a server this test stopped, so later tests have the whole fleet."""
    fleet.fleet.start(server)
    assert fleet.fleet.is_running(server)


# ---- fingerprints --------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT * FROM t WHERE id = 42", "select * from t where id = ?"),
        ("select 1.5, -3, 2e10, .5, 0x", "select ?, -?, ?, ?, ?x"),
        ("select * from t where name = 'it''s a secret'", "select * from t where name = ?"),
        (r"select E'it\'s \\ secret\n' || e'x'", "select ? || ?"),
        ("select $$it's 'secret'$$, $fn$ a 'b' c $fn$ as x", "select ?, ? as x"),
        ("select * from t where id in (1, 2, 3, 4)", "select * from t where id in (?)"),
        ("select * from t where s in ('a', 'b')", "select * from t where s in (?)"),
        ("select * from t where id = $1 and s = $2", "select * from t where id = ? and s = ?"),
        (
            "select * from t where id = %s and s = %(name)s",
            "select * from t where id = ? and s = ?",
        ),
        ("select 1 -- secret comment\n from t", "select ? from t"),
        ("select /* secret */ a from t", "select a from t"),
        ("select   a,\n\tb   FROM   t ;", "select a, b from t"),
        (
            'select "MyCol", t1.col_2 from "My Table" t1',
            'select "MyCol", t1.col_2 from "My Table" t1',
        ),
        (
            "insert into orders_2024 (id, total) values (7, 19.99)",
            "insert into orders_2024 (id, total) values (?)",
        ),
        ("select '2024-01-01'::date, b'101', x'ff', n'nat'", "select ?::date, ?, ?, ?"),
        ("select 'unterminated secret", "select ?"),
    ],
)
def test_fingerprint(query: str, expected: str) -> None:
    assert fingerprint(query) == expected


def test_fingerprint_never_keeps_values() -> None:
    templates = (
        "select 'SECRET'",
        "select E'SECRET\\''",
        "select $x$SECRET$x$",
        "select * from t where a in ('SECRET', 'b')",
        "update t set pw = 'SECRET' where id = 99",
        "select 'SECRET",
        "select * from t where a = 'x' -- SECRET",
    )
    for template in templates:
        q = template.replace("SECRET", "hunter2-77")
        fp = fingerprint(q)
        assert "hunter" not in fp and "99" not in fp, (q, fp)
    # Same shape, different constants and layout: one fingerprint.
    assert fingerprint("select * from t where id = 1") == fingerprint(
        "SELECT *\n  FROM t\tWHERE id = 2;"
    )
    assert len(fingerprint("select " + ", ".join(["a"] * 1000))) <= 1000


def test_fingerprint_dollar_quote_with_dollars_inside() -> None:
    """A tagged dollar quote ends only at its own tag: `$$` inside it is part
    of the string (as in function bodies), and nothing after it leaks."""
    q = "select $x$ a $$ hunter2-77 $x$ as v"
    assert fingerprint(q) == "select ? as v"
    q = "create function f() returns text language sql as $fn$ select $$hunter2$$ $fn$"
    assert fingerprint(q) == "create function f() returns text language sql as ?"


def test_fingerprint_nested_comment() -> None:
    """PostgreSQL block comments nest; all of one is removed."""
    assert fingerprint("select a /* x /* y */ hunter2 */ from t") == "select a from t"


# ---- histograms ----------------------------------------------------------------


def _dense(n: int, start: float, factor: float) -> list[float]:
    return [start * factor**i for i in range(n)]


def test_histogram_buckets_hold_their_values() -> None:
    for v in [0.051, 0.07, 0.5, 1, 3.3, 10, 99.9, 1000, 123456.0]:
        i = histogram.bucket_of(v)
        lo, hi = histogram.bucket_bounds(i)
        assert lo * 0.9999 <= v <= hi * 1.0001, (v, i, lo, hi)
        assert hi / lo <= histogram.GROWTH + 1e-9
    assert histogram.bucket_of(0.01) == 0
    assert histogram.bucket_of(10**12) == histogram.BUCKETS - 1
    assert histogram.percentile(histogram.empty(), 50) is None


@pytest.mark.parametrize(
    "values",
    [
        [float(i) for i in range(1, 101)],
        _dense(500, 0.2, 1.02),
        [5.0] * 50 + [50.0] * 50 + [500.0] * 5,
        [0.3 + 0.01 * i for i in range(300)] + [40 + i for i in range(30)],
    ],
)
def test_histogram_percentile_within_a_bucket(values: list[float]) -> None:
    hist = histogram.empty()
    for v in values:
        hist[histogram.bucket_of(v)] += 1
    assert sum(hist) == len(values)
    last = 0.0
    # Percentiles where neighbouring values are closer than a bucket's width
    # (a histogram cannot know where between two far-apart values to put one).
    for q in (10, 25, 50, 75, 90, 95, 99, 100):
        got = histogram.percentile(hist, q)
        assert got is not None
        want = percentile_cont(values, q / 100)
        assert abs(got - want) <= 0.25 * want, (q, got, want)
        assert got >= last
        last = got


# ---- the advisor ---------------------------------------------------------------

CAPACITY = [
    RegionCapacity("us-east-1", 1, 15, 1000),
    RegionCapacity("eu-central-1", 1, 0, 1000),
    RegionCapacity("ap-southeast-1", 1, 0, 1000),
]


def test_advisor_recommends_a_server_for_a_dominant_region() -> None:
    recs = advise(
        requested={"eu-west-1": 85, "us-east-1": 10, "eu-central-1": 5},
        capacity=CAPACITY,
        default_region="us-east-1",
    )
    assert len(recs) == 1, recs
    r = recs[0]
    assert r.kind == "deploy_server" and r.region == "eu-west-1"
    assert r.share == 0.85 and r.tenants == 85
    for part in ("85", "100", "85%", "eu-west-1", "80%"):
        assert part in r.reason, (part, r.reason)


def test_advisor_threshold_and_sample() -> None:
    assert (
        advise(
            requested={"eu-west-1": 79, "us-east-1": 21},
            capacity=CAPACITY,
            default_region="us-east-1",
        )
        == []
    )
    exactly = advise(
        requested={"eu-west-1": 80, "us-east-1": 20}, capacity=CAPACITY, default_region="us-east-1"
    )
    assert [(r.kind, r.region, r.share) for r in exactly] == [("deploy_server", "eu-west-1", 0.8)]
    # 90% but too few projects to trust the share.
    assert (
        advise(
            requested={"eu-west-1": 45, "us-east-1": 5},
            capacity=CAPACITY,
            default_region="us-east-1",
            settings=AdvisorSettings(min_sample=100),
        )
        == []
    )
    # Configurable: a lower threshold and sample.
    recs = advise(
        requested={"ap-northeast-1": 6, "us-east-1": 4},
        capacity=CAPACITY,
        default_region="us-east-1",
        settings=AdvisorSettings(share_threshold=0.6, min_sample=10),
    )
    assert [(r.kind, r.region, r.tenants) for r in recs] == [("deploy_server", "ap-northeast-1", 6)]
    assert "60%" in recs[0].reason and "10" in recs[0].reason


def test_advisor_never_recommends_the_default_or_a_served_region() -> None:
    # The default region, even without any server listed.
    assert advise(requested={"us-east-1": 100}, capacity=[], default_region="us-east-1") == []
    assert (
        advise(requested={"eu-west-1": 95, "us-east-1": 5}, capacity=[], default_region="eu-west-1")
        == []
    )
    # A region that already has a server.
    assert (
        advise(
            requested={"eu-central-1": 95, "us-east-1": 5},
            capacity=CAPACITY,
            default_region="us-east-1",
        )
        == []
    )


def test_advisor_capacity() -> None:
    cap = [
        RegionCapacity("us-east-1", 2, 900, 1000),
        RegionCapacity("eu-central-1", 1, 840, 1000),
        RegionCapacity("ap-southeast-1", 1, 850, 1000),
        RegionCapacity("eu-west-1", 0, 0, 0),
    ]
    recs = advise(requested={"us-east-1": 10}, capacity=cap, default_region="us-east-1")
    got = {r.region: r for r in recs}
    assert set(got) == {"us-east-1", "ap-southeast-1"}, recs
    us = got["us-east-1"]
    assert us.kind == "add_capacity" and us.utilisation == 0.9 and us.tenants == 900
    for part in ("900", "1000", "90%", "2 server", "us-east-1"):
        assert part in us.reason, (part, us.reason)
    assert got["ap-southeast-1"].utilisation == 0.85
    higher = advise(
        requested={},
        capacity=cap,
        default_region="us-east-1",
        settings=AdvisorSettings(capacity_threshold=0.95),
    )
    assert higher == []


# ---- costs ---------------------------------------------------------------------


def test_cost_estimate_default_prices() -> None:
    rep = estimate(
        servers_per_region={"us-east-1": 1, "eu-central-1": 1, "ap-southeast-1": 1},
        tenants_per_region={"us-east-1": 8, "eu-central-1": 2},
        free_tenants=7,
        paid_tenants=3,
    )
    assert rep.currency == "EUR"
    assert rep.total_monthly == 120.0
    by_region = {r.region: r for r in rep.regions}
    assert set(by_region) == {"us-east-1", "eu-central-1", "ap-southeast-1"}
    assert by_region["us-east-1"].monthly == 40.0 and by_region["us-east-1"].per_tenant == 5.0
    assert by_region["eu-central-1"].per_tenant == 20.0
    assert (
        by_region["ap-southeast-1"].tenants == 0 and by_region["ap-southeast-1"].per_tenant is None
    )
    assert rep.per_tenant == 12.0
    opts = {o.id: o for o in rep.options}
    assert list(opts) == ["current", "three_servers", "hybrid", "full_cloud"]
    assert opts["current"].monthly == 120.0
    assert opts["three_servers"].monthly == 120.0
    assert opts["hybrid"].monthly == pytest.approx(40 + 3 * 25 * 0.92)
    assert opts["full_cloud"].monthly == pytest.approx(10 * 20 * 0.92)
    assert opts["full_cloud"].monthly_high == pytest.approx(10 * 50 * 0.92)


def test_cost_estimate_custom_prices() -> None:
    rep = estimate(
        servers_per_region={"us-east-1": 2, "eu-central-1": 1},
        tenants_per_region={"us-east-1": 4, "us-west-1": 0},
        free_tenants=0,
        paid_tenants=4,
        prices=Prices(
            currency="USD",
            server_monthly=50.0,
            region_server_monthly={"eu-central-1": 70.0},
            managed_project_usd=10.0,
            cloud_tenant_usd_low=1.0,
            cloud_tenant_usd_high=2.0,
        ),
    )
    by_region = {r.region: r for r in rep.regions}
    assert by_region["us-east-1"].monthly == 100.0 and by_region["us-east-1"].per_tenant == 25.0
    assert by_region["eu-central-1"].monthly == 70.0
    assert by_region["us-west-1"].servers == 0 and by_region["us-west-1"].monthly == 0.0
    assert rep.total_monthly == 170.0
    opts = {o.id: o for o in rep.options}
    assert opts["three_servers"].monthly == 150.0
    assert opts["hybrid"].monthly == pytest.approx(50 + 4 * 10)  # USD: no conversion
    assert (opts["full_cloud"].monthly, opts["full_cloud"].monthly_high) == (4.0, 8.0)
    empty = estimate(servers_per_region={}, tenants_per_region={}, free_tenants=0, paid_tenants=0)
    assert empty.total_monthly == 0 and empty.per_tenant is None


# ---- query log partitions and retention ----------------------------------------


def _where(platform: Platform) -> dict[str, str]:
    """fingerprint -> the partition its row lives in."""
    return dict(rows_of(platform, "SELECT fingerprint, tableoid::regclass::text FROM query_logs"))


def _partitions(platform: Platform) -> set[str]:
    return {
        r[0]
        for r in rows_of(
            platform,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'query_logs'::regclass",
        )
    }


def test_query_logs_live_in_day_partitions(platform: Platform) -> None:
    tid = uuid.uuid4()
    now = datetime.now(UTC)
    days = {"today": now, "d3": now - timedelta(days=3), "d20": now - timedelta(days=20)}
    for name, at in days.items():
        QueryLogWriter.of(platform).log(rec(tid, "us-east-1", "rw", 1.0, at=at, fp=name))
    assert QueryLogWriter.of(platform).flush() == 3
    where = _where(platform)
    for name, at in days.items():
        assert where[name] == partition_name(at.date()) == f"query_logs_p{at:%Y%m%d}"

    # Rows for days without a partition go to the default partition; such a
    # day cannot get a partition afterwards, and its rows stay readable.
    d5 = (now - timedelta(days=5)).replace(hour=12)
    d30 = (now - timedelta(days=30)).replace(hour=12)
    with platform.db.connection() as conn:
        for fp, at in (("d5", d5), ("d30", d30)):
            conn.execute(
                "INSERT INTO query_logs (tenant_id, region, hosted_region, server_id, route, "
                "execution_time_ms, outcome, fingerprint, executed_at) "
                "VALUES (%s, 'us-east-1', 'us-east-1', 1, 'rw', 2.0, 'ok', %s, %s)",
                (tid, fp, at),
            )
        conn.commit()
        assert ensure_partition(conn, d5.date()) is False
        tomorrow = (now + timedelta(days=1)).date()
        assert ensure_partition(conn, tomorrow) is True
        assert ensure_partition(conn, tomorrow) is True  # idempotent
    where = _where(platform)
    assert where["d5"] == where["d30"] == "query_logs_default"
    assert partition_name((now + timedelta(days=1)).date()) in _partitions(platform)
    # The writer copes with a day whose rows sit in the default partition.
    QueryLogWriter.of(platform).log(rec(tid, "us-east-1", "rw", 1.0, at=d5, fp="d5-late"))
    QueryLogWriter.of(platform).flush()
    assert _where(platform)["d5-late"] == "query_logs_default"


def test_retention_drops_old_partitions_and_trims(platform: Platform) -> None:
    tid = uuid.uuid4()
    now = datetime.now(UTC)
    d3 = now - timedelta(days=3)
    d20 = now - timedelta(days=20)
    for fp, at in (("today", now), ("d3", d3), ("d20", d20)):
        QueryLogWriter.of(platform).log(rec(tid, "us-east-1", "rw", 1.0, at=at, fp=fp))
    QueryLogWriter.of(platform).flush()
    with platform.db.connection() as conn:
        for fp, days in (("d5", 5), ("d30", 30)):
            conn.execute(
                "INSERT INTO query_logs_default (tenant_id, execution_time_ms, fingerprint, "
                "executed_at) VALUES (%s, 1.0, %s, now() - make_interval(days => %s))",
                (tid, fp, days),
            )
        conn.commit()
    old_rollups = rows_of(
        platform, "SELECT count(*) FROM query_log_rollups WHERE bucket < now() - interval '14 days'"
    )[0][0]
    assert old_rollups == 1

    with platform.db.connection() as conn:
        dropped = apply_retention(conn, 14)
    assert dropped == 1
    parts = _partitions(platform)
    assert partition_name(d20.date()) not in parts
    assert {partition_name(now.date()), partition_name(d3.date()), "query_logs_default"} <= parts
    assert set(_where(platform)) == {"today", "d3", "d5"}
    assert (
        rows_of(
            platform,
            "SELECT count(*) FROM query_log_rollups WHERE bucket < now() - interval '14 days'",
        )[0][0]
        == 0
    )
    assert rows_of(platform, "SELECT count(*) FROM query_log_rollups")[0][0] == 2

    # A shorter retention drops more; running it again changes nothing.
    with platform.db.connection() as conn:
        assert apply_retention(conn, 2) == 1
        assert apply_retention(conn, 2) == 0
    assert set(_where(platform)) == {"today"}


def test_run_once_prepares_partitions(platform: Platform) -> None:
    run_once(platform)
    today = datetime.now(UTC).date()
    parts = _partitions(platform)
    for d in (today, today + timedelta(days=1), today + timedelta(days=2)):
        assert partition_name(d) in parts


# ---- the seed's queries agree with the API ---------------------------------------


def test_seed_queries_agree_with_the_api(api: Api, admin_api: Api, platform: Platform) -> None:
    projects = [
        create_ok(api, "a", region="us-east-1", plan_type="free"),
        create_ok(api, "b", region="us-east-1", plan_type="pro"),
        create_ok(api, "c", region="eu-central-1", plan_type="free"),
        create_ok(api, "d", region="eu-central-1", plan_type="enterprise"),
        create_ok(api, "e", region="eu-central-1", plan_type="pro"),
        create_ok(api, "f", region="us-west-1", plan_type="free"),
        create_ok(api, "g", region="ap-southeast-1", plan_type="free"),
    ]
    for i, p in enumerate(projects):
        for j in range(i + 1):
            sql_ok(api, p["id"], f"select {j}", mode="ro" if j % 2 else "rw")
    # And known durations, some old enough to fall outside 24 hours.
    old = datetime.now(UTC) - timedelta(days=2)
    extra = []
    for i, p in enumerate(projects):
        hosted = p["hosted_region"]
        extra += [rec(p["id"], p["region"], "rw", 10.0 * (i + 1), hosted=hosted) for _ in range(3)]
        extra.append(rec(p["id"], p["region"], "ro", 1000.0, hosted=hosted, at=old))
    write(platform, extra)
    QueryLogWriter.of(platform).flush()

    with platform.db.connection() as conn:
        dist = conn.execute(SEED_REGION_DISTRIBUTION).fetchall()
        perf = conn.execute(SEED_REGIONAL_PERFORMANCE).fetchall()

    regions = get_ok(admin_api, "/v1/admin/stats/regions")
    by_region = {r["region"]: r for r in regions["regions"]}
    assert dist[0][0] == "eu-central-1"
    for region, tenants, free, paid in dist:
        r = by_region[region]
        assert (r["tenants"], r["free"], r["paid"]) == (tenants, free, paid), region
    assert sum(r[1] for r in dist) == regions["total_tenants"] == 7
    assert {r[0] for r in dist} == {k for k, v in by_region.items() if v["tenants"]}

    api_perf = get_ok(admin_api, "/v1/admin/stats/performance", window="24h")
    assert api_perf["by"] == "region"
    per_region: dict[str, list[tuple[int, float]]] = {}
    for row in api_perf["rows"]:
        per_region.setdefault(row["region"], []).append((row["queries"], row["avg_ms"]))
    assert set(per_region) == {r[0] for r in perf}
    for region, avg, count in perf:
        routes = per_region[region]
        n = sum(c for c, _ in routes)
        assert n == count, region
        combined = sum(c * a for c, a in routes) / n
        assert abs(combined - float(avg)) <= 0.01, (region, combined, avg)
    counts = {r[0]: r[2] for r in perf}
    # 1+2 SQL calls and 6 known durations in us-east-1; us-west-1 stays itself.
    assert counts["us-east-1"] == 3 + 6
    assert counts["us-west-1"] == 6 + 3
    assert counts["eu-central-1"] == (3 + 4 + 5) + 9
    assert counts["ap-southeast-1"] == 7 + 3


# ---- performance statistics ------------------------------------------------------


def _stats_data() -> tuple[list[QueryLogRecord], dict[tuple[str, str], list[tuple[float, bool]]]]:
    """Records for a few tenants, regions and routes, and per (region, route)
    the (duration, failed) pairs expected in a 24h window."""
    t_eu1, t_eu2, t_west = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    records: list[QueryLogRecord] = []
    expect: dict[tuple[str, str], list[tuple[float, bool]]] = {}

    def add(tid: uuid.UUID, region: str, route: str, ms: float, fail: bool, hosted: str) -> None:
        at = now - timedelta(minutes=1 + len(records) % 600)
        records.append(
            rec(tid, region, route, ms, at=at, outcome="57014" if fail else "ok", hosted=hosted)
        )
        expect.setdefault((region, route), []).append((ms, fail))

    for i in range(400):
        add(
            t_eu1 if i % 2 else t_eu2,
            "eu-central-1",
            "rw",
            0.5 + 0.25 * i,
            i % 10 == 0,
            "eu-central-1",
        )
    for i in range(300):
        add(t_eu2, "eu-central-1", "ro", 2.0 * 1.015**i, i % 50 == 7, "eu-central-1")
    for i in range(120):
        add(t_west, "us-west-1", "rw", 10.0 + 0.5 * i, i % 20 == 0, "us-east-1")
    # Outside a 24h window.
    for _ in range(10):
        records.append(
            rec(t_eu1, "eu-central-1", "rw", 5000.0, at=now - timedelta(days=2), outcome="ok")
        )
    return records, expect


def test_performance_exact_percentiles(admin_api: Api, platform: Platform) -> None:
    records, expect = _stats_data()
    write(platform, records)
    body = get_ok(admin_api, "/v1/admin/stats/performance", window="24h")
    assert body["exact"] is True and body["window"] == "24h"
    got = {(r["region"], r["route"]): r for r in body["rows"]}
    assert set(got) == set(expect)
    for key, pairs in expect.items():
        row = got[key]
        values = [ms for ms, _ in pairs]
        errors = sum(1 for _, f in pairs if f)
        assert row["queries"] == len(values), key
        assert row["errors"] == errors, key
        assert row["error_rate"] == round(errors / len(values), 4), key
        assert row["avg_ms"] == pytest.approx(sum(values) / len(values), abs=1e-3), key
        for q, name in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
            assert row[name] == pytest.approx(percentile_cont(values, q), abs=1e-3), (key, name)

    # By hosting region, the us-west-1 project counts for us-east-1.
    hosted = get_ok(admin_api, "/v1/admin/stats/performance", window="24h", by="hosted_region")
    keys = {(r["hosted_region"], r["route"]): r["queries"] for r in hosted["rows"]}
    assert keys == {
        ("eu-central-1", "rw"): 400,
        ("eu-central-1", "ro"): 300,
        ("us-east-1", "rw"): 120,
    }

    # Older logs only in a longer window.
    week = get_ok(admin_api, "/v1/admin/stats/performance", window="7d")
    rows = {(r["region"], r["route"]): r for r in week["rows"]}
    assert rows[("eu-central-1", "rw")]["queries"] == 410
    short = get_ok(admin_api, "/v1/admin/stats/performance", window="30m")
    assert sum(r["queries"] for r in short["rows"]) < sum(len(v) for v in expect.values())


def test_performance_from_rollups(
    admin_api: Api, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    records, expect = _stats_data()
    # In several batches, so rollup rows are added up as well as created.
    for i in range(0, len(records), 97):
        write(platform, records[i : i + 97])
    monkeypatch.setattr(stats, "EXACT_LIMIT", 0)
    body = get_ok(admin_api, "/v1/admin/stats/performance", window="24h")
    assert body["exact"] is False
    got = {(r["region"], r["route"]): r for r in body["rows"]}
    assert set(got) == set(expect)
    for key, pairs in expect.items():
        row = got[key]
        values = [ms for ms, _ in pairs]
        errors = sum(1 for _, f in pairs if f)
        assert row["queries"] == len(values), key
        assert row["errors"] == errors, key
        assert row["error_rate"] == round(errors / len(values), 4)
        assert row["avg_ms"] == pytest.approx(sum(values) / len(values), abs=2e-3), key
        for q, name in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
            want = percentile_cont(values, q)
            assert abs(row[name] - want) <= 0.25 * want, (key, name, row[name], want)
    week = get_ok(admin_api, "/v1/admin/stats/performance", window="7d")
    assert {(r["region"], r["route"]): r["queries"] for r in week["rows"]}[
        ("eu-central-1", "rw")
    ] == 410


@pytest.mark.parametrize("window", ["30m", "24h", "7d", "1m", "31d", " 2h "])
def test_window_ok(window: str) -> None:
    td = stats.parse_window(window)
    assert timedelta(0) < td <= timedelta(days=31)


def test_window_values() -> None:
    assert stats.parse_window("30m") == timedelta(minutes=30)
    assert stats.parse_window("24h") == timedelta(hours=24)
    assert stats.parse_window("7d") == timedelta(days=7)


@pytest.mark.parametrize("window", ["abc", "0h", "40d", "32d", "", "24", "1w", "-1h", "1.5h"])
def test_window_invalid(window: str, admin_api: Api) -> None:
    with pytest.raises(InvalidInput):
        stats.parse_window(window)
    r = admin_api.get("/v1/admin/stats/performance", params={"window": window})
    assert r.status_code == 422, r.text
    assert "window" in r.json()["error"]["message"]


def test_window_excludes_older_logs(admin_api: Api, platform: Platform) -> None:
    tid = uuid.uuid4()
    now = datetime.now(UTC)
    write(
        platform,
        [
            rec(tid, "us-east-1", "rw", 1.0, at=now - timedelta(minutes=5)),
            rec(tid, "us-east-1", "rw", 2.0, at=now - timedelta(hours=2)),
            rec(tid, "us-east-1", "rw", 3.0, at=now - timedelta(days=3)),
        ],
    )

    def count(window: str) -> int:
        rows = get_ok(admin_api, "/v1/admin/stats/performance", window=window)["rows"]
        return sum(r["queries"] for r in rows)

    assert count("30m") == 1
    assert count("3h") == 2
    assert count("24h") == 2
    assert count("4d") == 3


# ---- a project's own stats -------------------------------------------------------


def test_project_stats(api: Api, admin_api: Api, client: TestClient, platform: Platform) -> None:
    pid = create_ok(api, region="eu-central-1")["id"]
    other = create_ok(api, "other")["id"]
    for i in range(4):
        sql_ok(api, pid, f"select {i} as n")
    sql_ok(api, pid, "select pg_sleep(0.05)")
    sql_ok(api, pid, "select 'x' || 'y'", mode="ro")
    sql_ok(api, pid, "select 'x' || 'z'", mode="ro")
    r = api.post(f"/v1/projects/{pid}/sql", json={"query": "select 1/0"})
    assert r.status_code == 400
    sql_ok(api, other, "select 1")
    QueryLogWriter.of(platform).flush()

    body = get_ok(api, f"/v1/projects/{pid}/stats")
    assert body["project_id"] == pid and body["window"] == "24h"
    routes = {r["route"]: r for r in body["routes"]}
    assert set(routes) == {"rw", "ro"}
    assert routes["rw"]["queries"] == 6 and routes["rw"]["errors"] == 1
    assert routes["rw"]["error_rate"] == round(1 / 6, 4)
    assert routes["ro"]["queries"] == 2 and routes["ro"]["errors"] == 0
    assert routes["rw"]["p50_ms"] < 50 < routes["rw"]["avg_ms"] * 6
    top = body["top_statements"]
    assert top[0]["fingerprint"] == "select pg_sleep(?)"
    assert top[0]["avg_ms"] >= 50
    fps = {t["fingerprint"]: t for t in top}
    assert fps["select ? as n"]["calls"] == 4
    assert fps["select ? || ?"]["calls"] == 2
    assert fps["select ?/?"]["errors"] == 1
    assert all("'" not in t["fingerprint"] for t in top)

    assert get_ok(api, f"/v1/projects/{other}/stats")["routes"][0]["queries"] == 1
    assert get_ok(api, f"/v1/projects/{pid}/stats", window="1m")["routes"]
    r = api.get(f"/v1/projects/{pid}/stats", params={"window": "40d"})
    assert r.status_code == 422

    _, bob_token = create_owner(platform, "bob")
    r = Api(client, bob_token).get(f"/v1/projects/{pid}/stats")
    assert r.status_code == 404, r.text
    assert api.get(f"/v1/projects/{uuid.uuid4()}/stats").status_code == 404


# ---- region statistics and health ----------------------------------------------


def test_region_stats(api: Api, admin_api: Api, platform: Platform, fleet: FleetUnderTest) -> None:
    a = create_ok(api, "a", region="us-east-1", plan_type="free")
    create_ok(api, "b", region="us-east-1", plan_type="pro")
    c = create_ok(api, "c", region="eu-central-1", plan_type="pro")
    create_ok(api, "d", region="eu-central-1", plan_type="free")
    w = create_ok(api, "w", region="us-west-1", plan_type="free")
    gone = create_ok(api, "gone", region="ap-southeast-1", plan_type="free")
    assert w["hosted_region"] == "us-east-1"
    assert api.delete(f"/v1/projects/{gone['id']}").status_code == 200
    with platform.db.connection() as conn:
        conn.execute("UPDATE tenants SET status = 'paused' WHERE id = %s", (a["id"],))
        conn.execute("UPDATE tenants SET status = 'failed' WHERE id = %s", (c["id"],))

    body = get_ok(admin_api, "/v1/admin/stats/regions")
    assert body["total_tenants"] == 5
    assert body["requested_not_hosted"] == 1
    regions = {r["region"]: r for r in body["regions"]}
    assert list(regions) == list(ALL_REGIONS)
    us, eu, west, ap = (
        regions[k] for k in ("us-east-1", "eu-central-1", "us-west-1", "ap-southeast-1")
    )
    assert (us["tenants"], us["free"], us["paid"]) == (2, 1, 1)
    assert (us["active"], us["paused"], us["failed"]) == (1, 1, 0)
    assert (eu["tenants"], eu["free"], eu["paid"], eu["active"], eu["failed"]) == (2, 1, 1, 1, 1)
    assert (west["tenants"], west["free"], west["requested_not_hosted_here"]) == (1, 1, 1)
    assert west["status"] == "metadata-only" and west["servers"] == []
    assert ap["tenants"] == 0 and ap["share"] == 0
    assert us["hosted"] == 3 and eu["hosted"] == 2 and west["hosted"] == 0
    assert us["share"] == 0.4 and eu["share"] == 0.4 and west["share"] == 0.2
    assert sum(r["share"] for r in regions.values()) == pytest.approx(1.0)
    for rid in ACTIVE_REGIONS:
        assert regions[rid]["status"] == "active"
        assert len(regions[rid]["servers"]) == 1, regions[rid]
    for rid in ("us-west-1", "eu-west-1", "ap-northeast-1"):
        assert regions[rid]["status"] == "metadata-only" and regions[rid]["servers"] == []
    assert us["servers"][0]["tenants"] == 3  # b, w and the paused a
    assert us["servers"][0]["healthy"] is None  # no check yet

    checks = run_once(platform)
    assert checks is not None and all(c.ok for c in checks), checks
    body = get_ok(admin_api, "/v1/admin/stats/regions")
    regions = {r["region"]: r for r in body["regions"]}
    for rid in ACTIVE_REGIONS:
        srv = regions[rid]["servers"][0]
        assert srv["healthy"] is True, srv
        assert srv["latency_ms"] is not None and srv["latency_ms"] >= 0
        assert 1 <= srv["connections_used"] < srv["connections_max"], srv
        assert srv["databases"] == len(fleet.databases(rid)), (rid, srv)
        assert srv["bytes"] > 0
        assert regions[rid]["databases"] == srv["databases"]
        assert regions[rid]["bytes"] == srv["bytes"]
    assert regions["us-east-1"]["servers"][0]["databases"] == 3
    assert regions["eu-central-1"]["servers"][0]["databases"] == 2
    assert regions["ap-southeast-1"]["servers"][0]["databases"] == 0

    assert api.get("/v1/admin/stats/regions").status_code == 403
    assert api.get("/v1/admin/stats/performance").status_code == 403


def test_health_history(
    admin_api: Api, client: TestClient, platform: Platform, fleet: FleetUnderTest
) -> None:
    servers = dict(rows_of(platform, "SELECT id, region FROM servers WHERE enabled"))
    assert sorted(servers.values()) == sorted(ACTIVE_REGIONS)
    run_once(platform)
    rows = rows_of(platform, "SELECT server_id, ok, version, connections_max FROM server_health")
    assert sorted(r[0] for r in rows) == sorted(servers)
    assert all(r[1] and r[2] and r[3] for r in rows), rows
    run_once(platform)
    assert rows_of(platform, "SELECT count(*) FROM server_health")[0][0] == 2 * len(servers)

    server = fleet.server("ap-southeast-1")
    sid = next(k for k, v in servers.items() if v == "ap-southeast-1")
    fleet.fleet.stop(server)
    try:
        checks = run_once(platform)
        assert checks is not None
        latest = dict(
            rows_of(
                platform,
                "SELECT DISTINCT ON (server_id) server_id, ok FROM server_health "
                "ORDER BY server_id, checked_at DESC, id DESC",
            )
        )
        assert latest[sid] is False
        assert all(ok for k, ok in latest.items() if k != sid)
        err = rows_of(
            platform,
            "SELECT error FROM server_health WHERE server_id = %s ORDER BY id DESC LIMIT 1",
            sid,
        )[0][0]
        assert err == "unreachable"
        health = client.get("/health").json()
        assert health["status"] == "degraded"
        assert health["regions"]["ap-southeast-1"]["status"] == "degraded"
        assert health["regions"]["us-east-1"]["status"] == "ok"
        regions = {r["region"]: r for r in get_ok(admin_api, "/v1/admin/stats/regions")["regions"]}
        assert regions["ap-southeast-1"]["servers"][0]["healthy"] is False
        assert regions["us-east-1"]["servers"][0]["healthy"] is True
    finally:
        restart(fleet, server)
    run_once(platform)
    regions = {r["region"]: r for r in get_ok(admin_api, "/v1/admin/stats/regions")["regions"]}
    assert regions["ap-southeast-1"]["servers"][0]["healthy"] is True
    assert rows_of(platform, "SELECT count(*) FROM server_health")[0][0] == 4 * len(servers)


# ---- advisor and costs through the API -----------------------------------------


def test_advisor_and_costs_api(api: Api, admin_api: Api) -> None:
    create_ok(api, "a", region="us-east-1", plan_type="free")
    create_ok(api, "b", region="eu-central-1", plan_type="pro")
    create_ok(api, "c", region="us-west-1", plan_type="free")
    create_ok(api, "d", region="eu-central-1", plan_type="enterprise")

    adv = get_ok(admin_api, "/v1/admin/advisor")
    assert adv["total_tenants"] == 4
    assert adv["requested"] == {"us-east-1": 1, "eu-central-1": 2, "us-west-1": 1}
    assert adv["settings"] == {
        "share_threshold": 0.8,
        "min_sample": 100,
        "capacity_threshold": 0.85,
    }
    assert adv["recommendations"] == []

    cost = get_ok(admin_api, "/v1/admin/costs")
    assert cost["currency"] == "EUR"
    regions = {r["region"]: r for r in cost["regions"]}
    assert {k: (v["servers"], v["tenants"], v["monthly"]) for k, v in regions.items()} == {
        "us-east-1": (1, 2, 40.0),
        "eu-central-1": (1, 2, 40.0),
        "ap-southeast-1": (1, 0, 40.0),
    }
    assert regions["us-east-1"]["per_tenant"] == 20.0
    assert regions["ap-southeast-1"]["per_tenant"] is None
    assert cost["total_monthly"] == 120.0 and cost["per_tenant"] == 30.0
    opts = {o["id"]: o for o in cost["options"]}
    assert opts["current"]["monthly"] == 120.0
    assert opts["three_servers"]["monthly"] == 120.0
    assert opts["hybrid"]["monthly"] == pytest.approx(40 + 2 * 25 * 0.92)
    assert opts["full_cloud"]["monthly"] == pytest.approx(4 * 20 * 0.92)
    assert opts["full_cloud"]["monthly_high"] == pytest.approx(4 * 50 * 0.92)

    assert api.get("/v1/admin/advisor").status_code == 403
    assert api.get("/v1/admin/costs").status_code == 403


def test_advisor_api_with_settings(platform_factory: Any) -> None:
    p: Platform = platform_factory(
        advisor_min_sample=3, advisor_share_threshold=0.6, embedded_capacity=2
    )
    _, token = create_owner(p, "root", is_admin=True)
    with TestClient(create_app(p)) as c:
        admin = Api(c, token)
        for name, region in (("a", "eu-west-1"), ("b", "eu-west-1"), ("c", "ap-southeast-1")):
            create_ok(admin, name, region=region)
        adv = get_ok(admin, "/v1/admin/advisor")
    assert adv["settings"] == {"share_threshold": 0.6, "min_sample": 3, "capacity_threshold": 0.85}
    recs = {(r["kind"], r["region"]): r for r in adv["recommendations"]}
    # eu-west-1 (2 of 3 projects) has no server; its projects fill us-east-1's.
    assert set(recs) == {("deploy_server", "eu-west-1"), ("add_capacity", "us-east-1")}, recs
    dep = recs[("deploy_server", "eu-west-1")]
    assert dep["tenants"] == 2 and dep["share"] == pytest.approx(0.6667, abs=1e-4)
    assert "2 of 3" in dep["reason"] and "60%" in dep["reason"]
    cap = recs[("add_capacity", "us-east-1")]
    assert cap["tenants"] == 2 and cap["utilisation"] == 1.0
    assert "room for 2" in cap["reason"]


# ---- /metrics ------------------------------------------------------------------


def _metrics(admin_api: Api) -> dict[str, Any]:
    r = admin_api.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def _sample(fam: Any, suffix: str, **labels: str) -> float:
    total = 0.0
    found = False
    for s in fam.samples:
        if s.name == fam.name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
            found = True
    assert found, (fam.name, suffix, labels, fam.samples)
    return total


def test_metrics(api: Api, admin_api: Api, client: TestClient, platform: Platform) -> None:
    assert client.get("/metrics").status_code == 401
    assert api.get("/metrics").status_code == 403

    p = create_ok(api, "m", region="eu-central-1")
    w = create_ok(api, "w", region="us-west-1")
    for _ in range(3):
        sql_ok(api, p["id"], "select 1")
    for _ in range(2):
        sql_ok(api, p["id"], "select 1", mode="ro")
    sql_ok(api, w["id"], "select 1")
    assert api.post(f"/v1/projects/{p['id']}/sql", json={"query": "select 1/0"}).status_code == 400
    run_once(platform)

    fams = _metrics(admin_api)
    for name in (
        "pgfleet_http_requests",
        "pgfleet_http_request_duration_seconds",
        "pgfleet_provisions",
        "pgfleet_provision_duration_seconds",
        "pgfleet_queries",
        "pgfleet_query_duration_seconds",
        "pgfleet_server_up",
        "pgfleet_tenant_pools",
    ):
        assert name in fams, (name, sorted(fams))

    q = fams["pgfleet_queries"]
    assert _sample(q, "_total", region="eu-central-1", route="rw", outcome="ok") == 3
    assert _sample(q, "_total", region="eu-central-1", route="ro", outcome="ok") == 2
    assert _sample(q, "_total", region="eu-central-1", route="rw", outcome="22012") == 1
    assert _sample(q, "_total", region="us-east-1", route="rw") == 1
    qd = fams["pgfleet_query_duration_seconds"]
    assert _sample(qd, "_count", region="eu-central-1", route="rw") == 4

    http = fams["pgfleet_http_requests"]
    route = "/v1/projects/{project_id}/sql"
    assert _sample(http, "_total", method="POST", route=route, status="200") == 6
    assert _sample(http, "_total", method="POST", route=route, status="400") == 1
    assert _sample(http, "_total", method="GET", route="/metrics", status="403") == 1

    prov = fams["pgfleet_provisions"]
    assert _sample(prov, "_total", region="eu-central-1", outcome="ok") == 1
    assert _sample(prov, "_total", region="us-east-1", outcome="ok") == 1
    assert _sample(fams["pgfleet_provision_duration_seconds"], "_count", region="eu-central-1") == 1

    up = {s.labels["region"]: s.value for s in fams["pgfleet_server_up"].samples}
    assert up == {r: 1.0 for r in ACTIVE_REGIONS}
    assert _sample(fams["pgfleet_tenant_pools"], "") >= 3  # eu rw, eu ro, us-west rw


# ---- the CLI -------------------------------------------------------------------


def invoke(url: str, token: str, *args: str) -> Result:
    return CliRunner().invoke(
        cli_app, [*args, "--url", url, "--token", token], env={"COLUMNS": "250"}
    )


def ok(url: str, token: str, *args: str) -> str:
    res = invoke(url, token, *args)
    assert res.exit_code == 0, (args, res.output, res.exception)
    return res.stdout


@pytest.mark.usefixtures("cli_env")
def test_cli_monitoring(api: Api, admin_api: Api, api_url: str, platform: Platform) -> None:
    p = create_ok(api, "a", region="eu-central-1", plan_type="pro")
    create_ok(api, "b", region="us-west-1", plan_type="free")
    for _ in range(3):
        sql_ok(api, p["id"], "select 1")
    sql_ok(api, p["id"], "select 1", mode="ro")
    QueryLogWriter.of(platform).flush()
    run_once(platform)
    token = admin_api.token

    out = ok(api_url, token, "stats", "regions")
    for rid in ALL_REGIONS:
        assert rid in out, (rid, out)
    line = next(ln for ln in out.splitlines() if "eu-central-1" in ln)
    assert "🇪🇺" in line and "0/1" in line and "50%" in line, line
    assert "1 project(s) picked a region that does not host them" in " ".join(out.split())
    data = json.loads(ok(api_url, token, "stats", "regions", "--json"))
    assert data["total_tenants"] == 2

    out = ok(api_url, token, "stats", "performance")
    rows = [ln for ln in out.splitlines() if "eu-central-1" in ln]
    assert any(" rw " in ln and " 3 " in ln for ln in rows), out
    assert any(" ro " in ln and " 1 " in ln for ln in rows), out
    data = json.loads(ok(api_url, token, "stats", "performance", "--window", "1h", "--json"))
    assert data["window"] == "1h" and data["exact"] is True
    assert {(r["region"], r["route"]): r["queries"] for r in data["rows"]} == {
        ("eu-central-1", "rw"): 3,
        ("eu-central-1", "ro"): 1,
    }
    res = invoke(api_url, token, "stats", "performance", "--window", "40d")
    assert res.exit_code != 0 and "window" in res.stderr

    out = ok(api_url, token, "advisor")
    assert "No recommendation" in out and "2 project(s)" in out
    assert json.loads(ok(api_url, token, "advisor", "--json"))["total_tenants"] == 2

    out = ok(api_url, token, "costs")
    assert "120.00" in out and "us-east-1" in out and "Hybrid" in out
    data = json.loads(ok(api_url, token, "costs", "--json"))
    assert data["total_monthly"] == 120.0

    res = invoke(api_url, api.token, "costs")
    assert res.exit_code != 0 and "admin" in res.stderr


@pytest.mark.usefixtures("cli_env")
def test_cli_status_shows_server_health(api: Api, fleet: FleetUnderTest) -> None:
    """`pgfleet status` shows each server's health check: up, round trip,
    connections used / max, tenant databases, size."""
    create_ok(api, "a", region="eu-central-1")
    create_ok(api, "b", region="eu-central-1")
    max_conn = {}
    for rid in ACTIVE_REGIONS:
        with fleet.admin_conn(rid) as c:
            row = c.execute("SELECT current_setting('max_connections')").fetchone()
            assert row is not None
            max_conn[rid] = row[0]
    env = {
        "COLUMNS": "250",
        "PGFLEET_HOME": str(fleet.settings.home),
        "PGFLEET_PORT_BASE": str(fleet.settings.port_base),
    }
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(cli_app, ["status"], env=env)
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 0, (res.output, res.exception)
    for rid in ACTIVE_REGIONS:
        line = next(ln for ln in res.stdout.splitlines() if f" {rid} " in ln)
        cells = [c.strip() for c in line.split("│") if c.strip()]
        assert "up" in cells, line
        assert re.fullmatch(r"[0-9.]+ ms", cells[4]), line
        used, most = cells[5].split("/")
        assert int(used) >= 1 and most == max_conn[rid], line
        assert int(cells[6]) == len(fleet.databases(rid)), line
        assert cells[7] != "-", line
    eu = next(ln for ln in res.stdout.splitlines() if " eu-central-1 " in ln)
    assert [c.strip() for c in eu.split("│") if c.strip()][6] == "2", eu
