"""Tokens and owners through the REST API: missing, wrong and revoked tokens,
tokens stored hashed, every owner sees only its own projects, admin routes."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from psycopg import sql

from pgfleet.auth import create_owner
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from tests.helpers import MISSING_ID, Api, FleetUnderTest, create_ok, error_of


def test_missing_and_wrong_tokens_are_401(client: TestClient, owner: tuple[Owner, str]) -> None:
    token = owner[1]
    assert token.startswith("pgf_")
    cases: list[dict[str, str]] = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {token}"},
        {"Authorization": "Bearer pgf_" + "A" * 43},
        {"Authorization": f"Bearer {token}x"},
        {"Authorization": f"Bearer {token[:-1]}"},
        {"Authorization": f"Bearer abc_{token[4:]}"},
        {"Authorization": f"Bearer {token[4:]}"},
        {"Authorization": "Bearer pgf_" + "x" * 5000},
    ]
    for headers in cases:
        for method, path in (
            ("get", "/v1/projects"),
            ("post", "/v1/projects"),
            ("get", "/v1/regions"),
            ("get", f"/v1/projects/{MISSING_ID}"),
        ):
            kw: dict[str, Any] = {"headers": headers}
            if method == "post":
                kw["json"] = {"name": "sneaky"}
            r = getattr(client, method)(path, **kw)
            assert r.status_code == 401, (headers, path, r.text)
            assert error_of(r)["code"] == "not_authenticated"
    # The real token works, and nothing was created by the rejected calls.
    r = client.get("/v1/projects", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert r.json()["projects"] == []


def test_revoked_token_is_401(api: Api, client: TestClient) -> None:
    r = api.post("/v1/tokens", json={"name": "laptop"})
    assert r.status_code == 201, r.text
    created = r.json()
    second = Api(client, created["token"])
    assert created["token"].startswith("pgf_")
    assert second.get("/v1/me").status_code == 200
    listed = api.get("/v1/tokens").json()["tokens"]
    assert created["id"] in [t["id"] for t in listed]
    assert all(created["token"] != t["token_prefix"] for t in listed)

    r = api.delete(f"/v1/tokens/{created['id']}")
    assert r.status_code == 204, r.text
    r = second.get("/v1/projects")
    assert r.status_code == 401, r.text
    assert second.post("/v1/projects", json={"name": "x"}).status_code == 401
    # The token used to revoke keeps working.
    assert api.get("/v1/projects").status_code == 200
    revoked = [t for t in api.get("/v1/tokens").json()["tokens"] if t["id"] == created["id"]]
    assert revoked[0]["revoked_at"]


def test_cannot_revoke_another_owners_token(
    api: Api, client: TestClient, platform: Platform
) -> None:
    _, bob_token = create_owner(platform, "bob")
    bob = Api(client, bob_token)
    tid = bob.post("/v1/tokens", json={"name": "bob2"}).json()["id"]
    assert api.delete(f"/v1/tokens/{tid}").status_code == 404
    assert api.delete("/v1/tokens/not-a-uuid").status_code == 404
    assert tid in [t["id"] for t in bob.get("/v1/tokens").json()["tokens"]]
    assert all(t["revoked_at"] is None for t in bob.get("/v1/tokens").json()["tokens"])


def test_token_values_are_not_stored(
    api: Api, platform: Platform, owner: tuple[Owner, str]
) -> None:
    extra = api.post("/v1/tokens", json={"name": "second"}).json()["token"]
    tokens = [owner[1], extra]
    with platform.db.connection() as conn:
        rows = conn.execute("SELECT t::text FROM api_tokens t").fetchall()
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
            )
        ]
        everything = []
        for table in tables:
            everything += conn.execute(
                sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(table))
            ).fetchall()
    assert len(rows) == 2
    for token in tokens:
        secret = token[len("pgf_") + 6 :]  # beyond the displayed prefix
        for (text,) in rows + everything:
            assert token not in text
            assert secret not in text


def test_other_owners_projects_are_404(
    api: Api, client: TestClient, platform: Platform, fleet: FleetUnderTest
) -> None:
    mine = create_ok(api, "alice's", region="eu-central-1")
    pid = mine["id"]
    _, bob_token = create_owner(platform, "bob")
    bob = Api(client, bob_token)
    assert bob.get("/v1/projects").json()["projects"] == []
    assert bob.get("/v1/projects", params={"include_deleted": "true"}).json()["projects"] == []
    for method, path in (
        ("get", f"/v1/projects/{pid}"),
        ("get", f"/v1/projects/{pid}/connection"),
        ("get", f"/v1/projects/{pid}/connection?mode=ro"),
        ("delete", f"/v1/projects/{pid}"),
    ):
        r = getattr(bob, method)(path)
        assert r.status_code == 404, (method, path, r.text)
        # Exactly what a project that does not exist gets.
        assert error_of(r) == {"code": "project_not_found", "message": f"project {pid} not found"}
    # Bob's DELETE did nothing.
    assert api.get(f"/v1/projects/{pid}").json()["status"] == "active"
    assert mine["connection"]["database"] in fleet.databases("eu-central-1")
    # And bob's own project is invisible to alice.
    theirs = create_ok(bob, "bob's")
    assert [p["id"] for p in api.get("/v1/projects").json()["projects"]] == [pid]
    assert api.get(f"/v1/projects/{theirs['id']}").status_code == 404


def test_admin_sees_every_owners_projects(api: Api, admin_api: Api) -> None:
    alices = create_ok(api, "alice's")
    admins = create_ok(admin_api, "admin's")
    listed = {p["id"] for p in admin_api.get("/v1/projects").json()["projects"]}
    assert listed == {alices["id"], admins["id"]}
    assert admin_api.get(f"/v1/projects/{alices['id']}").status_code == 200
    r = admin_api.get(f"/v1/projects/{alices['id']}/connection")
    assert r.status_code == 200, r.text
    assert {p["id"] for p in api.get("/v1/projects").json()["projects"]} == {alices["id"]}
    owners = {o["name"]: o for o in admin_api.get("/v1/admin/owners").json()["owners"]}
    assert owners["alice"]["projects"] == 1
    assert owners["admin"]["is_admin"] is True


def test_non_admin_cannot_use_admin_routes(api: Api) -> None:
    for method, path, kw in (
        ("get", "/v1/admin/owners", {}),
        ("post", "/v1/admin/owners", {"json": {"name": "mallory", "is_admin": True}}),
        ("get", "/v1/admin/servers", {}),
    ):
        r = getattr(api, method)(path, **kw)
        assert r.status_code == 403, (path, r.text)
        assert error_of(r)["code"] == "forbidden"


def test_admin_creates_owner_with_working_token(
    admin_api: Api, api: Api, client: TestClient
) -> None:
    alices = create_ok(api, "alice's")
    r = admin_api.post("/v1/admin/owners", json={"name": "carol"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["owner"]["name"] == "carol"
    assert body["owner"]["is_admin"] is False
    assert body["token"].startswith("pgf_")
    carol = Api(client, body["token"])
    me = carol.get("/v1/me")
    assert me.status_code == 200, me.text
    assert me.json()["id"] == body["owner"]["id"]
    assert carol.get("/v1/projects").json()["projects"] == []
    assert carol.get(f"/v1/projects/{alices['id']}").status_code == 404
    created = create_ok(carol, "carol's", region="ap-southeast-1")
    assert created["status"] == "active"
    assert carol.get("/v1/admin/owners").status_code == 403
    r = admin_api.post("/v1/admin/owners", json={"name": ""})
    assert r.status_code == 422, r.text
