from __future__ import annotations

from tests.helpers import Api, FleetUnderTest, run_psql


def test_create_project_in_region(api: Api, fleet: FleetUnderTest) -> None:
    r = api.post(
        "/v1/projects", json={"name": "shop", "region": "eu-central-1", "plan_type": "free"}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["hosted_region"] == "eu-central-1"
    db = body["connection"]["database"]
    assert db in fleet.databases("eu-central-1")
    assert db not in fleet.databases("us-east-1")
    res = run_psql(body["connection"]["uri"], "select current_user")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == body["connection"]["user"]
