"""Monitoring: fingerprints, histograms, advisor and costs as pure functions;
query-log partitions and retention, statistics, health history, metrics and
the CLI on the real fleet."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from pgfleet.api.app import create_app
from pgfleet.auth import create_owner
from pgfleet.cli import app as cli_app
from pgfleet.config import get_settings
from pgfleet.monitoring.background import run_once
from pgfleet.monitoring.querylog import (
    QueryLogWriter,
)
from pgfleet.platform.core import Platform
from tests.helpers import (
    Api,
    FleetUnderTest,
    create_ok,
    get_ok,
    invoke,
    ok,
    restart,
    rows_of,
    sql_ok,
)

ACTIVE_REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-1")


ALL_REGIONS = (
    "us-east-1",
    "us-west-1",
    "eu-central-1",
    "eu-west-1",
    "ap-southeast-1",
    "ap-northeast-1",
)


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
    # eu rw and eu ro came back, so they have pools; us-west's one statement
    # ran on a connection of its own.
    assert _sample(fams["pgfleet_tenant_pools"], "") >= 2


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
    assert any(ln.split("\t")[1:3] == ["rw", "3"] for ln in rows), out
    assert any(ln.split("\t")[1:3] == ["ro", "1"] for ln in rows), out
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
        line = next(ln for ln in res.stdout.splitlines() if f"\t{rid}\t" in ln)
        cells = line.split("\t")
        assert "up" in cells, line
        assert re.fullmatch(r"[0-9.]+ ms", cells[4]), line
        used, most = cells[5].split("/")
        assert int(used) >= 1 and most == max_conn[rid], line
        assert int(cells[6]) == len(fleet.databases(rid)), line
        assert cells[7] != "-", line
    eu = next(ln for ln in res.stdout.splitlines() if "\teu-central-1\t" in ln)
    assert eu.split("\t")[6] == "2", eu
