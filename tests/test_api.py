"""The REST API through FastAPI's TestClient, against the real embedded fleet."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pgfleet.api.app import create_app
from pgfleet.auth import create_owner
from pgfleet.operations.runtime import OperationsRuntime
from pgfleet.platform.core import Platform
from tests.helpers import MISSING_ID, Api, FleetUnderTest, create, create_ok, error_of, run_psql

ALL_REGIONS = (
    "us-east-1",
    "us-west-1",
    "eu-central-1",
    "eu-west-1",
    "ap-southeast-1",
    "ap-northeast-1",
)


ACTIVE_REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-1")


METADATA_ONLY_REGIONS = ("us-west-1", "eu-west-1", "ap-northeast-1")


FLAGS = {
    "us-east-1": "🇺🇸",
    "us-west-1": "🇺🇸",
    "eu-central-1": "🇪🇺",
    "eu-west-1": "🇪🇺",
    "ap-southeast-1": "🇸🇬",
    "ap-northeast-1": "🇯🇵",
}


def all_tenant_databases(fleet: FleetUnderTest) -> set[str]:
    return set().union(*(fleet.databases(r) for r in fleet.regions()))


def all_tenant_roles(fleet: FleetUnderTest) -> set[str]:
    return set().union(*(fleet.roles(r) for r in fleet.regions()))


def platform_rows(platform: Platform, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with platform.db.connection() as conn:
        return conn.execute(query, params).fetchall()


def test_create_project_returns_fields_and_working_uri(api: Api, fleet: FleetUnderTest) -> None:
    body = create_ok(api, "shop", region="eu-central-1", plan_type="pro")
    uuid.UUID(body["id"])
    assert body["name"] == "shop"
    assert body["subdomain"]
    assert body["region"] == "eu-central-1"
    assert body["region_flag"] == "🇪🇺"
    assert body["hosted_region"] == "eu-central-1"
    assert body["plan_type"] == "pro"
    assert body["status"] == "active"
    conn = body["connection"]
    assert conn["mode"] == "rw"
    assert conn["uri"].startswith("postgresql://")
    assert conn["database"] == "tenant_" + body["id"].replace("-", "_")
    # The database lives on the eu-central-1 server and nowhere else.
    assert conn["database"] in fleet.databases("eu-central-1")
    for region in fleet.regions():
        if region != "eu-central-1":
            assert conn["database"] not in fleet.databases(region)
    res = run_psql(conn["uri"], "select current_user, current_database()")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{conn['user']}|{conn['database']}"


def test_list_get_and_connection_modes(api: Api) -> None:
    body = create_ok(api, "lister", region="ap-southeast-1")
    pid = body["id"]

    r = api.get("/v1/projects")
    assert r.status_code == 200, r.text
    listed = r.json()["projects"]
    assert [p["id"] for p in listed] == [pid]
    assert listed[0]["status"] == "active"
    assert "connection" not in listed[0]  # credentials only on create and /connection

    r = api.get(f"/v1/projects/{pid}")
    assert r.status_code == 200, r.text
    shown = r.json()
    assert shown["id"] == pid
    assert shown["name"] == "lister"
    assert shown["region"] == shown["hosted_region"] == "ap-southeast-1"
    assert shown["region_flag"] == "🇸🇬"

    r = api.get(f"/v1/projects/{pid}/connection", params={"mode": "rw"})
    assert r.status_code == 200, r.text
    rw = r.json()
    assert rw["mode"] == "rw"
    res = run_psql(rw["uri"], "create table t (x int); insert into t values (1)")
    assert res.returncode == 0, res.stderr

    r = api.get(f"/v1/projects/{pid}/connection", params={"mode": "ro"})
    assert r.status_code == 200, r.text
    ro = r.json()
    assert ro["mode"] == "ro"
    assert ro["database"] == rw["database"]
    res = run_psql(ro["uri"], "select count(*) from t")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1"
    res = run_psql(ro["uri"], "insert into t values (2)")
    assert res.returncode != 0
    assert "read-only" in res.stderr
    res = run_psql(rw["uri"], "select count(*) from t")
    assert res.stdout.strip() == "1"


def test_ro_uri_cannot_be_switched_to_writing(api: Api) -> None:
    """Whoever holds only the ro connection string must not be able to write,
    even by asking for a read-write transaction."""
    body = create_ok(api, "readers")
    pid = body["id"]
    res = run_psql(body["connection"]["uri"], "create table t (x int)")
    assert res.returncode == 0, res.stderr
    ro = api.get(f"/v1/projects/{pid}/connection", params={"mode": "ro"}).json()
    wrote = []
    for attempt in (
        "set default_transaction_read_only = off; insert into t values (1)",
        "begin read write; insert into t values (1); commit",
        "set session characteristics as transaction read write; insert into t values (1)",
    ):
        before = run_psql(body["connection"]["uri"], "select count(*) from t").stdout.strip()
        run_psql(ro["uri"], attempt)
        after = run_psql(body["connection"]["uri"], "select count(*) from t").stdout.strip()
        if after != before:
            wrote.append(attempt)
    assert wrote == [], "the ro connection string could write"
    # ...and yet it reads what the project writes, including tables made later.
    run_psql(body["connection"]["uri"], "create table later (y int); insert into later values (7)")
    res = run_psql(ro["uri"], "select (select count(*) from t), (select y from later)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0|7"
    for ddl in (
        "begin read write; create table mine (z int)",
        "begin read write; create temp table tmp (z int)",
    ):
        denied = run_psql(ro["uri"], ddl)
        assert denied.returncode != 0 and "denied" in denied.stderr, (ddl, denied.stderr)


def test_delete_project(api: Api, fleet: FleetUnderTest) -> None:
    body = create_ok(api, "doomed", region="eu-central-1")
    pid = body["id"]
    db = body["connection"]["database"]
    assert db in fleet.databases("eu-central-1")

    r = api.delete(f"/v1/projects/{pid}")
    assert r.status_code == 200, r.text
    assert r.json()["project"]["status"] == "deleted"
    assert r.json()["project"]["deleted_at"]
    assert r.json()["operation"]["type"] == "delete"
    assert r.json()["operation"]["status"] == "finished"

    assert api.get(f"/v1/projects/{pid}").status_code == 404
    assert api.get(f"/v1/projects/{pid}/connection").status_code == 404
    assert api.delete(f"/v1/projects/{pid}").status_code == 404
    assert api.get("/v1/projects").json()["projects"] == []
    r = api.get("/v1/projects", params={"include_deleted": "true"})
    assert r.status_code == 200, r.text
    listed = r.json()["projects"]
    assert [(p["id"], p["status"]) for p in listed] == [(pid, "deleted")]
    assert db not in all_tenant_databases(fleet)
    # The gate role named like the database, and both login roles, are gone.
    assert {db, f"{db}_rw", f"{db}_ro"} & all_tenant_roles(fleet) == set()
    res = run_psql(body["connection"]["uri"], "select 1")
    assert res.returncode != 0


def test_deleted_project_frees_its_subdomain(api: Api) -> None:
    first = create_ok(api, "one", subdomain="reused")
    assert create(api, "two", subdomain="reused").status_code == 409
    assert api.delete(f"/v1/projects/{first['id']}").status_code == 200
    second = create_ok(api, "two", subdomain="reused")
    assert second["subdomain"] == "reused"


def test_unknown_region_names_every_valid_region(api: Api, fleet: FleetUnderTest) -> None:
    r = create(api, "shop", region="mars-north-1")
    assert r.status_code == 422, r.text
    err = error_of(r)
    assert "mars-north-1" in err["message"]
    for region in ALL_REGIONS:
        assert region in err["message"]
    assert api.get("/v1/projects").json()["projects"] == []
    assert all_tenant_databases(fleet) == set()


def test_unknown_plan_names_every_valid_plan(api: Api, fleet: FleetUnderTest) -> None:
    r = create(api, "shop", plan_type="platinum")
    assert r.status_code == 422, r.text
    err = error_of(r)
    for plan in ("free", "pro", "enterprise"):
        assert plan in err["message"]
    assert api.get("/v1/projects").json()["projects"] == []
    assert all_tenant_databases(fleet) == set()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "   ",
        "\t\n ",
        "x" * 101,
        "bad\x01name",
        "two\nlines",
        "nul\x00byte",
        "bell\x07",
        "del\x7f",
    ],
    ids=["empty", "spaces", "whitespace", "101-chars", "ctrl-01", "newline", "nul", "bell", "del"],
)
def test_bad_names_are_422(api: Api, fleet: FleetUnderTest, name: str) -> None:
    r = create(api, name)
    assert r.status_code == 422, r.text
    err = error_of(r)
    assert "name" in err["message"]
    assert api.get("/v1/projects").json()["projects"] == []
    assert all_tenant_databases(fleet) == set()


def test_missing_or_non_string_name_is_422(api: Api) -> None:
    r = api.post("/v1/projects", json={"region": "us-east-1"})
    assert r.status_code == 422, r.text
    assert "name" in error_of(r)["message"]
    r = api.post("/v1/projects", json={"name": 42})
    assert r.status_code == 422, r.text
    r = api.post("/v1/projects", content=b"not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text


def test_name_of_exactly_100_characters_is_accepted(api: Api) -> None:
    body = create_ok(api, "n" * 100)
    assert body["name"] == "n" * 100


@pytest.mark.parametrize(
    "subdomain",
    ["Shop", "bad_sub", "-lead", "trail-", "with.dot", "x" * 64, "spa ce", "ünï"],
)
def test_bad_subdomain_is_422(api: Api, fleet: FleetUnderTest, subdomain: str) -> None:
    r = create(api, "shop", subdomain=subdomain)
    assert r.status_code == 422, r.text
    assert "subdomain" in error_of(r)["message"]
    assert all_tenant_databases(fleet) == set()


def test_duplicate_subdomain_is_409_and_leaves_nothing(api: Api, fleet: FleetUnderTest) -> None:
    first = create_ok(api, "shop", subdomain="shop")
    assert first["subdomain"] == "shop"
    r = create(api, "other shop", subdomain="shop", region="eu-central-1")
    assert r.status_code == 409, r.text
    assert "shop" in error_of(r)["message"]
    assert [p["id"] for p in api.get("/v1/projects").json()["projects"]] == [first["id"]]
    assert all_tenant_databases(fleet) == {first["connection"]["database"]}


def test_hostile_name_is_stored_verbatim(
    api: Api, platform: Platform, fleet: FleetUnderTest
) -> None:
    name = "Robert'); DROP TABLE tenants;-- 🐘 Zoë"
    body = create_ok(api, name, region="eu-central-1")
    assert body["name"] == name
    assert api.get(f"/v1/projects/{body['id']}").json()["name"] == name
    assert platform_rows(platform, "SELECT to_regclass('public.tenants') IS NOT NULL") == [(True,)]
    assert platform_rows(platform, "SELECT name FROM tenants WHERE id = %s", body["id"]) == [
        (name,)
    ]
    # Names never reach the servers' catalogs: only the opaque uuid does.
    assert fleet.databases("eu-central-1") == {body["connection"]["database"]}
    # The derived subdomain is still a clean DNS label.
    sub = body["subdomain"]
    assert sub == sub.lower()
    assert all(c.isascii() and (c.isalnum() or c == "-") for c in sub)
    res = run_psql(body["connection"]["uri"], "select 1")
    assert res.returncode == 0, res.stderr


def test_names_with_joiners_are_accepted(api: Api) -> None:
    """Emoji ZWJ sequences and the Persian zero-width non-joiner are ordinary
    unicode text, not control characters."""
    for name in ("👩\u200d💻 dev team", "کتاب\u200cخانه"):
        r = create(api, name)
        assert r.status_code == 201, (name, r.text)
        assert r.json()["name"] == name


def test_bad_connection_mode_and_malformed_ids(api: Api) -> None:
    pid = create_ok(api)["id"]
    r = api.get(f"/v1/projects/{pid}/connection", params={"mode": "xx"})
    assert r.status_code == 422, r.text
    assert "mode" in error_of(r)["message"]
    for bad in ("not-a-uuid", "123", MISSING_ID, "'; DROP TABLE tenants;--"):
        for method, path in (
            ("get", f"/v1/projects/{bad}"),
            ("delete", f"/v1/projects/{bad}"),
            ("get", f"/v1/projects/{bad}/connection"),
        ):
            r = getattr(api, method)(path)
            assert r.status_code == 404, (method, path, r.text)
            assert error_of(r)["code"] == "project_not_found"
    assert api.get(f"/v1/projects/{pid}").status_code == 200


def test_regions_catalog(api: Api) -> None:
    r = api.get("/v1/regions")
    assert r.status_code == 200, r.text
    regions = {x["id"]: x for x in r.json()}
    assert set(regions) == set(ALL_REGIONS)
    assert len(r.json()) == 6
    for rid, flag in FLAGS.items():
        assert regions[rid]["flag"] == flag, rid
        assert regions[rid]["name"]
    for rid in ACTIVE_REGIONS:
        assert regions[rid]["status"] == "active", rid
        assert regions[rid]["server_count"] == 1, rid
    for rid in METADATA_ONLY_REGIONS:
        assert regions[rid]["status"] == "metadata-only", rid
        assert regions[rid]["server_count"] == 0, rid
    assert [rid for rid, x in regions.items() if x["default"]] == ["us-east-1"]


def test_openapi_describes_the_api(client: TestClient) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200, r.text
    doc = r.json()
    for path in (
        "/v1/regions",
        "/v1/projects",
        "/v1/projects/{project_id}",
        "/v1/projects/{project_id}/connection",
        "/health",
    ):
        assert path in doc["paths"], path
    assert {"get", "post"} <= set(doc["paths"]["/v1/projects"])
    assert {"get", "delete"} <= set(doc["paths"]["/v1/projects/{project_id}"])
    schemas = doc["components"]["schemas"]
    create_props = set(schemas["ProjectCreate"]["properties"])
    assert {"name", "subdomain", "region", "plan_type"} <= create_props
    assert "name" in schemas["ProjectCreate"].get("required", [])
    out_props = set(schemas["ProjectOut"]["properties"])
    assert {"id", "name", "subdomain", "region", "plan_type", "status"} <= out_props

    # Every 403 the API answers is in the document (found missing by a
    # newcomer): a read-only token changing something, a non-admin on an
    # admin route, a read-only token asking for the read-write credentials.
    paths = doc["paths"]
    for method, path in (
        ("post", "/v1/projects"),
        ("post", "/v1/tokens"),
        ("post", "/v1/projects/{project_id}/sql"),
        ("post", "/v1/projects/{project_id}/pause"),
        ("delete", "/v1/projects/{project_id}"),
        ("get", "/v1/projects/{project_id}/connection"),
        ("get", "/v1/admin/owners"),
        ("get", "/v1/admin/stats/regions"),
        ("get", "/v1/admin/servers"),
        ("get", "/v1/admin/advisor"),
    ):
        assert "403" in paths[path][method]["responses"], (method, path)
    assert "403" not in paths["/v1/projects"]["get"]["responses"]


def test_health_without_token(client: TestClient, platform: Platform) -> None:
    OperationsRuntime.of(
        platform
    ).start_workers()  # an API process runs one; without any, health is degraded
    r = client.get("/health")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok"
    assert body["platform_db"]["ok"] is True
    assert set(body["regions"]) == set(ALL_REGIONS)
    for rid in ACTIVE_REGIONS:
        assert body["regions"][rid]["status"] == "ok", rid
        assert [s["ok"] for s in body["regions"][rid]["servers"]] == [True]
    for rid in METADATA_ONLY_REGIONS:
        assert body["regions"][rid]["status"] == "metadata-only", rid
        assert body["regions"][rid]["servers"] == []


def test_region_down_is_503_and_leaves_nothing(
    api: Api, client: TestClient, platform: Platform, fleet: FleetUnderTest
) -> None:
    before = create_ok(api, "before", region="eu-central-1")  # warms the admin pool
    server = fleet.server("eu-central-1")
    fleet.fleet.stop(server)
    try:
        assert not fleet.fleet.is_running(server)
        r = client.get("/health")
        assert r.status_code == 200, r.text
        health = r.json()
        assert health["status"] == "degraded"
        assert health["regions"]["eu-central-1"]["status"] == "degraded"
        assert health["regions"]["eu-central-1"]["servers"][0]["ok"] is False
        assert health["regions"]["us-east-1"]["status"] == "ok"
        assert health["regions"]["ap-southeast-1"]["status"] == "ok"

        r = create(api, "during", region="eu-central-1", subdomain="during")
        assert r.status_code == 503, r.text
        err = error_of(r)
        assert "eu-central-1" in err["message"]
        assert err["code"] == "region_unavailable"
        rows = platform_rows(
            platform,
            "SELECT id, status FROM tenants WHERE region = 'eu-central-1' AND id <> %s",
            before["id"],
        )
        assert [s for _, s in rows if s == "active"] == []
        listed = api.get("/v1/projects").json()["projects"]
        assert [p["status"] for p in listed if p["name"] == "during"] in ([], ["failed"])

        # Other regions keep working meanwhile.
        elsewhere = create_ok(api, "elsewhere", region="us-east-1")
        res = run_psql(elsewhere["connection"]["uri"], "select 1")
        assert res.returncode == 0, res.stderr
        assert api.get(f"/v1/projects/{before['id']}").json()["status"] == "active"
    finally:
        fleet.fleet.start(server)

    # Nothing half-created anywhere: only the two good projects' databases/roles.
    good = {before["connection"]["database"], elsewhere["connection"]["database"]}
    assert all_tenant_databases(fleet) == good
    # each project has its gate role (named like the database) and its two login roles
    assert all_tenant_roles(fleet) == good | {
        f"{db}_{kind}" for db in good for kind in ("rw", "ro")
    }
    for rid, status in platform_rows(platform, "SELECT id, status FROM tenants"):
        if str(rid) not in (before["id"], elsewhere["id"]):
            assert status != "active"

    # The region recovers once its server is back.
    assert client.get("/health").json()["status"] == "ok"
    res = run_psql(before["connection"]["uri"], "select 1")
    assert res.returncode == 0, res.stderr
    after = create_ok(api, "after", region="eu-central-1")
    assert after["connection"]["database"] in fleet.databases("eu-central-1")


def test_an_owner_has_at_most_its_quota_of_projects(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    """A quota bounds what one owner can make (and so what one owner can do
    to a server); deleting frees a place; admins have none."""
    platform: Platform = platform_factory(max_projects_per_owner=2)
    _, token = create_owner(platform, "bounded")
    _, admin_token = create_owner(platform, "root", is_admin=True)
    with TestClient(create_app(platform)) as client:
        api, admin = Api(client, token), Api(client, admin_token)
        first = create_ok(api, "one", region="us-east-1")["id"]
        create_ok(api, "two", region="us-east-1")
        before = fleet.databases("us-east-1")
        r = create(api, "three", region="us-east-1")
        err = error_of(r, 403)
        assert err["code"] == "quota_exceeded" and "at most 2" in err["message"], err
        assert fleet.databases("us-east-1") == before
        assert len(api.get("/v1/projects").json()["projects"]) == 2
        assert api.delete(f"/v1/projects/{first}").status_code == 200
        create_ok(api, "three", region="us-east-1")
        for i in range(3):
            create_ok(admin, f"admin-{i}", region="us-east-1")
