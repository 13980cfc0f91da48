"""Monitoring's pure functions: fingerprints, histograms, the advisor and
cost estimates. No server needed."""

from __future__ import annotations

from datetime import timedelta

import pytest

from pgfleet.monitoring import histogram, stats
from pgfleet.monitoring.advisor import AdvisorSettings, RegionCapacity, advise
from pgfleet.monitoring.costs import Prices, estimate
from pgfleet.monitoring.fingerprint import fingerprint
from tests.helpers import percentile_cont


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
        # Tags and identifiers past ASCII are PostgreSQL's identifiers too.
        ("select $täg$ it's secret $täg$, ünï_2 from t", "select ?, ünï_2 from t"),
        ("select $日本$ secret $日本$ where x1 = 7", "select ? where x1 = ?"),
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


@pytest.mark.parametrize("window", ["30m", "24h", "7d", "1m", "31d", " 2h "])
def test_window_ok(window: str) -> None:
    td = stats.parse_window(window)
    assert timedelta(0) < td <= timedelta(days=31)


def test_window_values() -> None:
    assert stats.parse_window("30m") == timedelta(minutes=30)
    assert stats.parse_window("24h") == timedelta(hours=24)
    assert stats.parse_window("7d") == timedelta(days=7)


def test_costs_never_add_usd_to_eur_without_the_rate() -> None:
    from pgfleet.monitoring.costs import Prices, estimate

    report = estimate(
        servers_per_region={"us-east-1": 1},
        tenants_per_region={"us-east-1": 2},
        free_tenants=1,
        paid_tenants=1,
        prices=Prices(currency="EUR", usd_to_eur=0.5),
    )
    mixed = [o for o in report.options if "USD" in o.description]
    assert mixed and all("0.5 EUR per USD" in o.description for o in mixed)
    hybrid = next(o for o in report.options if o.id == "hybrid")
    assert hybrid.monthly == Prices().server_monthly + 25 * 0.5
