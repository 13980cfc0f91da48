"""Tokens with an expiry and a scope (issue 14, item 10): a read-only token
lists, shows and queries (mode ro) and changes nothing; an expired token is
401 saying when; the admin's console lists owners and tokens, creates and
revokes them, and shows each project's owner."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from tests.helpers import Api, create_ok, error_of, login, run, scalar
from tests.test_cli import Cli


def _token(api: Api, **body: Any) -> dict[str, Any]:
    r = api.post("/v1/tokens", json={"name": "t", **body})
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def test_a_read_only_token_lists_shows_and_queries_but_changes_nothing(
    api: Api, client: TestClient
) -> None:
    p = create_ok(api, "watched", region="eu-central-1")
    pid = p["id"]
    assert run(api, pid, "create table t (x int)").status_code == 200
    assert run(api, pid, "insert into t values (1), (2)").status_code == 200
    made = _token(api, scope="read")
    assert made["scope"] == "read" and made["expires_at"] is None
    ro = Api(client, made["token"])
    # Lists, shows and queries.
    assert [x["id"] for x in ro.get("/v1/projects").json()["projects"]] == [pid]
    assert ro.get(f"/v1/projects/{pid}").status_code == 200
    assert ro.get(f"/v1/projects/{pid}/stats").status_code == 200
    assert scalar(ro, pid, "select count(*) from t", mode="ro") == 2
    conn = ro.get(f"/v1/projects/{pid}/connection", params={"mode": "ro"})
    assert conn.status_code == 200 and login(conn.json()["uri"]) == "ok"
    # Changes nothing, and says why.
    err = error_of(run(ro, pid, "insert into t values (3)"), 403)
    assert "read-only (scope read)" in err["message"] and "mode ro" in err["message"], err
    err = error_of(ro.get(f"/v1/projects/{pid}/connection"), 403)  # the rw password
    assert "`--mode ro` in the CLI" in err["message"], err  # what to type there
    for method, path, body in (
        ("post", "/v1/projects", {"name": "nope"}),
        ("delete", f"/v1/projects/{pid}", None),
        ("post", f"/v1/projects/{pid}/pause", None),
        ("post", f"/v1/projects/{pid}/rotate-password", {"role": "all"}),
        ("post", "/v1/tokens", {"name": "escalate"}),
        ("post", f"/v1/projects/{pid}/backups", None),
    ):
        r = getattr(ro, method)(path, **({"json": body} if body is not None else {}))
        assert "read-only" in error_of(r, 403)["message"], (method, path)
    # An idempotency key is the owner's: a read-only token naming a key an
    # all-scope token used is still refused, not answered from the replay.
    key = {"Idempotency-Key": "k-1"}
    body = {"query": "insert into t values (4)"}
    assert api.post(f"/v1/projects/{pid}/sql", json=body, headers=key).status_code == 200
    error_of(ro.post(f"/v1/projects/{pid}/sql", json=body, headers=key), 403)
    assert scalar(api, pid, "select count(*) from t") == 3
    assert api.get(f"/v1/projects/{pid}").json()["status"] == "active"
    assert len(api.get("/v1/tokens").json()["tokens"]) == 2  # the owner's and the read one


def test_an_expired_token_is_401_saying_when(
    api: Api, client: TestClient, platform: Platform
) -> None:
    p = create_ok(api, "clocked")
    made = _token(api, expires_in_days=30)
    assert made["expires_at"]
    short = Api(client, made["token"])
    assert short.get("/v1/projects").status_code == 200
    assert scalar(short, p["id"], "select 1") == 1  # the SQL API caches the lookup
    with platform.db.connection() as conn:  # thirty days later
        conn.execute(
            "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE id = %s",
            (made["id"],),
        )
    for r in (short.get("/v1/projects"), run(short, p["id"], "select 1")):
        err = error_of(r, 401)
        # A moment as people read it, not 2026-12-01T13:42:32.732221+00:00.
        assert re.search(r"expired at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC;", err["message"]), err
    listed = {t["id"]: t for t in api.get("/v1/tokens").json()["tokens"]}
    assert listed[made["id"]]["expired"] is True
    for bad in (0, 3651, "soon", True):  # true is not 1 day (found by the fuzz test)
        error_of(api.post("/v1/tokens", json={"name": "x", "expires_in_days": bad}), 422)
    error_of(api.post("/v1/tokens", json={"name": "x", "scope": "write"}), 422)


def test_an_admin_lists_and_revokes_any_owners_tokens(
    admin_api: Api, api: Api, owner: tuple[Owner, str], client: TestClient
) -> None:
    extra = _token(api, name="laptop")
    owners = admin_api.get("/v1/admin/owners").json()["owners"]
    alice = next(o for o in owners if o["id"] == str(owner[0].id))
    tokens = admin_api.get(f"/v1/admin/owners/{alice['id']}/tokens").json()["tokens"]
    assert {t["name"] for t in tokens} == {"default", "laptop"}
    assert api.get(f"/v1/admin/owners/{alice['id']}/tokens").status_code == 403
    assert api.delete(f"/v1/admin/tokens/{extra['id']}").status_code == 403
    assert admin_api.delete(f"/v1/admin/tokens/{extra['id']}").status_code == 204
    assert Api(client, extra["token"]).get("/v1/me").status_code == 401
    error_of(admin_api.get("/v1/admin/owners/not-an-id/tokens"), 404)


@pytest.mark.usefixtures("cli_env")
def test_the_cli_makes_scoped_expiring_tokens(api_url: str, owner: tuple[Owner, str]) -> None:
    cli = Cli(api_url, owner[1])
    made = cli.json("tokens", "create", "--name", "ci", "--scope", "read", "--expires-in", "7d")
    assert made["scope"] == "read" and made["expires_at"]
    listed = cli.ok("tokens", "list")
    row = next(ln for ln in listed.splitlines() if ln.startswith(made["id"]))
    cells = row.split("\t")
    assert cells[3] == "read" and cells[5].endswith("UTC"), row
    assert set(json.loads(json.dumps(cli.json("tokens", "list")))) == {"tokens"}
    said = cli.fails("projects", "create", "--name", "x", token=made["token"])
    assert "read-only" in said, said
    assert "takes days" in cli.fails("tokens", "create", "--expires-in", "soon")


def test_a_token_cannot_make_one_that_outlives_it(api: Api, client: TestClient) -> None:
    parent = _token(api, expires_in_days=2)
    short = Api(client, parent["token"])
    child = short.post("/v1/tokens", json={"name": "child"})
    assert child.status_code == 201, child.text
    assert child.json()["expires_at"] == parent["expires_at"]  # omitted: expires with it
    err = error_of(short.post("/v1/tokens", json={"name": "c", "expires_in_days": 30}), 422)
    assert "cannot outlive it" in err["message"], err
    assert short.post("/v1/tokens", json={"name": "c", "expires_in_days": 1}).status_code == 201
