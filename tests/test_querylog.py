"""The query log on the real platform DB: day partitions and retention, the
seed's queries, and the performance statistics computed from it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from pgfleet.errors import InvalidInput
from pgfleet.monitoring import stats
from pgfleet.monitoring.background import run_once
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
from tests.helpers import (
    Api,
    create_ok,
    get_ok,
    percentile_cont,
    rows_of,
    sql_ok,
)


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


def write(platform: Platform, records: list[QueryLogRecord]) -> None:
    with platform.db.connection() as conn:
        write_batch(conn, records)


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
