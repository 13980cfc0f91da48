"""POST /sql: the HTTP protocol of the Neon serverless driver, spoken to as
the driver speaks it (its headers, its bodies), against a live fleet. The
real driver runs against it in test_driver_node.py."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pgfleet.api.app import create_app
from pgfleet.auth import create_owner
from pgfleet.platform.core import Platform
from tests.helpers import Api, connect, create_ok, finished

REGION = "eu-central-1"
DRIVER_HEADERS = {"Neon-Raw-Text-Output": "true", "Neon-Array-Mode": "true"}


def conn_string(connection: dict[str, Any], *, password: str | None = None) -> str:
    """As the driver sends it: postgresql://user:password@host:port/db?application_name=..."""
    pw = connection["password"] if password is None else password
    return (
        f"postgresql://{connection['user']}:{pw}@{connection['host']}:{connection['port']}/"
        f"{connection['database']}?application_name=pkg%3Anpm%2F%2540neondatabase"
    )


def post(api: Api, cs: str, body: Any, **headers: str) -> Any:
    # The driver sends its JSON as text/plain.
    return api.client.post(
        "/sql",
        content=body if isinstance(body, str) else json.dumps(body),
        headers={
            "Neon-Connection-String": cs,
            "Content-Type": "text/plain;charset=UTF-8",
            **DRIVER_HEADERS,
            **headers,
        },
    )


@pytest.fixture
def project(api: Api) -> dict[str, Any]:
    p = create_ok(api, "edge", region=REGION)
    with connect(p["connection"]) as c:
        c.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, tags text[])")
        c.execute("INSERT INTO items VALUES (1, 'one', '{a,b}'), (2, 'two', NULL)")
    return p


def ro_connection(api: Api, p: dict[str, Any]) -> dict[str, Any]:
    r = api.get(f"/v1/projects/{p['id']}/connection", params={"mode": "ro"})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_a_query_with_params_answers_in_the_drivers_shape(api: Api, project: Any) -> None:
    r = post(
        api,
        conn_string(project["connection"]),
        {
            "query": "SELECT id, name, tags, $1::int + 1 AS n FROM items WHERE id = $2",
            "params": ["41", "1"],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rows"] == [["1", "one", "{a,b}", "42"]]
    assert body["command"] == "SELECT" and body["rowCount"] == 1 and body["rowAsArray"] is True
    fields = {f["name"]: f for f in body["fields"]}
    assert fields["id"]["dataTypeID"] == 23 and fields["id"]["columnID"] == 1
    assert fields["id"]["tableID"] > 0 and fields["n"]["tableID"] == 0
    assert fields["tags"]["dataTypeID"] == 1009 and fields["name"]["dataTypeID"] == 25
    assert all(f["format"] == "text" for f in body["fields"])
    # NULL is null; values are PostgreSQL's own text.
    r = post(
        api,
        conn_string(project["connection"]),
        {
            "query": "SELECT NULL::int, true, '\\x01ff'::bytea, '{\"k\": 1}'::jsonb, "
            "'2024-01-02 03:04:05+02'::timestamptz, 1.50::numeric, '1 day 02:00'::interval",
            "params": [],
        },
    )
    assert r.json()["rows"] == [
        [None, "t", "\\x01ff", '{"k": 1}', "2024-01-02 01:04:05+00", "1.50", "1 day 02:00:00"]
    ]


def test_writes_report_their_command_and_count(api: Api, project: Any) -> None:
    cs = conn_string(project["connection"])
    r = post(
        api,
        cs,
        {"query": "INSERT INTO items VALUES ($1, $2), (4, 'four')", "params": ["3", "three"]},
    )
    assert r.status_code == 200, r.text
    assert (r.json()["command"], r.json()["rowCount"], r.json()["rows"]) == ("INSERT", 2, [])
    r = post(api, cs, {"query": "CREATE TABLE t2 (x int)", "params": []})
    assert (r.json()["command"], r.json()["rowCount"]) == ("CREATE", None)
    with connect(project["connection"]) as c:
        assert c.execute("SELECT count(*) FROM items").fetchone() == (4,)


def test_a_transaction_commits_or_rolls_back_as_a_whole(api: Api, project: Any) -> None:
    cs = conn_string(project["connection"])
    r = post(
        api,
        cs,
        {
            "queries": [
                {"query": "INSERT INTO items VALUES ($1, 'x')", "params": ["10"]},
                {"query": "SELECT count(*) FROM items", "params": []},
                {"query": "SELECT current_setting('transaction_isolation')", "params": []},
            ]
        },
        **{"Neon-Batch-Isolation-Level": "Serializable", "Neon-Batch-Read-Only": "false"},
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["command"] for x in results] == ["INSERT", "SELECT", "SELECT"]
    assert results[1]["rows"] == [["3"]] and results[2]["rows"] == [["serializable"]]
    r = post(
        api,
        cs,
        {
            "queries": [
                {"query": "INSERT INTO items VALUES (11, 'y')", "params": []},
                {"query": "INSERT INTO items VALUES (1, 'dup')", "params": []},
            ]
        },
    )
    assert r.status_code == 400
    err = r.json()
    assert err["code"] == "23505" and err["constraint"] == "items_pkey"
    assert "Key (id)=(1) already exists" in err["detail"]
    with connect(project["connection"]) as c:
        ids = [row[0] for row in c.execute("SELECT id FROM items ORDER BY id")]
    assert ids == [1, 2, 10]  # the second transaction left nothing
    r = post(
        api,
        cs,
        {"queries": [{"query": "INSERT INTO items VALUES (12, 'z')", "params": []}]},
        **{"Neon-Batch-Read-Only": "true"},
    )
    assert r.status_code == 400 and r.json()["code"] == "25006"
    r = post(api, cs, {"queries": []}, **{"Neon-Batch-Isolation-Level": "Sometimes"})
    assert r.status_code == 400 and "invalid isolation level" in r.json()["message"]


def test_errors_carry_postgresqls_fields(api: Api, project: Any) -> None:
    cs = conn_string(project["connection"])
    r = post(api, cs, {"query": "SELEC 1", "params": []})
    assert r.status_code == 400
    err = r.json()
    assert err["code"] == "42601" and err["position"] == "1" and err["severity"] == "ERROR"
    assert err["message"] == 'syntax error at or near "SELEC"'
    r = post(api, cs, {"query": "BEGIN", "params": []})
    assert r.status_code == 400 and r.json()["code"] == "0A000"
    r = post(api, cs, "not json")
    assert r.status_code == 400 and "not JSON" in r.json()["message"]


def test_ro_credentials_read_and_never_write(api: Api, project: Any) -> None:
    cs = conn_string(ro_connection(api, project))
    r = post(api, cs, {"query": "SELECT name FROM items ORDER BY id", "params": []})
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == [["one"], ["two"]]
    for body in (
        {"query": "INSERT INTO items VALUES (5, 'five')", "params": []},
        {"queries": [{"query": "DELETE FROM items", "params": []}]},
    ):
        r = post(api, cs, body)
        assert r.status_code == 400 and r.json()["code"] in ("42501", "25006"), r.text
    with connect(project["connection"]) as c:
        assert c.execute("SELECT count(*) FROM items").fetchone() == (2,)


def test_every_failed_login_looks_the_same(api: Api, project: Any) -> None:
    other = create_ok(api, "other", region=REGION)
    mine, theirs = project["connection"], other["connection"]
    wrong = [
        conn_string(mine, password=mine["password"] + "x"),
        # Another project's user and password on this project's database.
        conn_string({**theirs, "database": mine["database"]}),
        conn_string({**mine, "database": "postgres"}),
        conn_string({**mine, "user": "pgfleet_admin"}),
        conn_string({**mine, "database": "tenant_00000000_0000_0000_0000_000000000000"}),
    ]
    for cs in wrong:
        r = post(api, cs, {"query": "SELECT 1", "params": []})
        assert r.status_code == 400, r.text
        err = r.json()
        assert err["code"] == "28P01", err
        assert err["message"].startswith("password authentication failed for user")
    r = post(api, "mysql://x", {"query": "SELECT 1", "params": []})
    assert r.status_code == 400 and r.json()["code"] == "08004"
    r = api.client.post("/sql", json={"query": "SELECT 1"})
    assert r.status_code == 400 and "Neon-Connection-String" in r.json()["message"]


def test_pause_and_rotation_take_effect_at_once(api: Api, project: Any) -> None:
    cs = conn_string(project["connection"])
    assert post(api, cs, {"query": "SELECT 1", "params": []}).status_code == 200
    finished(api, api.post(f"/v1/projects/{project['id']}/pause"))
    r = post(api, cs, {"query": "SELECT 1", "params": []})
    assert r.status_code == 400 and r.json()["code"] == "28000", r.text
    assert "paused" in r.json()["detail"]
    finished(api, api.post(f"/v1/projects/{project['id']}/resume"))
    assert post(api, cs, {"query": "SELECT 1", "params": []}).status_code == 200
    # A rotation with an overlap window: the old credentials keep working
    # until it ends, as over TCP; the new ones work at once.
    r = api.post(f"/v1/projects/{project['id']}/rotate-password", json={"overlap_s": 600})
    new = finished_connection(api, r)
    assert post(api, cs, {"query": "SELECT 1", "params": []}).status_code == 200
    assert post(api, conn_string(new), {"query": "SELECT 1", "params": []}).status_code == 200
    r = api.post(f"/v1/projects/{project['id']}/rotate-password")
    newer = finished_connection(api, r)
    assert post(api, conn_string(newer), {"query": "SELECT 1", "params": []}).status_code == 200
    r = post(api, conn_string(new), {"query": "SELECT 1", "params": []})
    assert r.json()["code"] == "28P01"


def finished_connection(api: Api, r: Any) -> dict[str, Any]:
    finished(api, r)
    connection: dict[str, Any] = r.json()["connection"]
    return connection


def test_results_over_the_plans_caps_are_refused_and_change_nothing(
    api: Api, project: Any, platform: Platform
) -> None:
    cs = conn_string(project["connection"])
    r = post(api, cs, {"query": "SELECT g FROM generate_series(1, 200000) g", "params": []})
    assert r.status_code == 400 and r.json()["code"] == "54000", r.text
    r = post(
        api,
        cs,
        {
            "query": "INSERT INTO items SELECT g, 'n' "
            "FROM generate_series(100, 200100) AS g RETURNING *",
            "params": [],
        },
    )
    assert r.status_code == 400 and r.json()["code"] == "54000", r.text
    with connect(project["connection"]) as c:
        assert c.execute("SELECT count(*) FROM items").fetchone() == (2,)
    # The byte cap (5 MiB on free) holds for a transaction's results together.
    three_mib = {"query": "SELECT repeat('x', 3 * 1024 * 1024)", "params": []}
    assert post(api, cs, three_mib).status_code == 200
    r = post(api, cs, {"queries": [three_mib, three_mib]})
    assert r.status_code == 400 and r.json()["code"] == "54000", r.text


def test_every_statement_is_logged_with_its_route(
    api: Api, project: Any, platform: Platform
) -> None:
    post(api, conn_string(project["connection"]), {"query": "SELECT 41", "params": []})
    post(api, conn_string(ro_connection(api, project)), {"query": "SELECT 42", "params": []})
    from pgfleet.monitoring.querylog import QueryLogWriter

    QueryLogWriter.of(platform).flush()
    with platform.db.connection() as conn:
        routes = {
            r[0]
            for r in conn.execute(
                "SELECT route FROM query_logs WHERE tenant_id = %s", (project["id"],)
            )
        }
    assert {"rw", "ro"} <= routes


# ---- what an attacker tried (each failed before its fix) --------------------------


def test_text_postgresql_cannot_hold_is_refused_and_logging_goes_on(
    api: Api, project: Any, platform: Platform
) -> None:
    cs = conn_string(project["connection"])
    for body in (
        {"query": "select 1 \u0000", "params": []},
        {"query": "select 1 as \ud800", "params": []},
        {"query": "select $1::text", "params": ["a\u0000b"]},
    ):
        r = post(api, cs, json.dumps(body))
        assert r.status_code == 400 and r.json()["code"] == "22021", r.text
    # A record PostgreSQL cannot store never holds up the query log.
    from pgfleet.monitoring.querylog import QueryLogRecord, QueryLogWriter, storable

    assert storable("a\u0000b\ud800") == "a\\0b\\ud800"
    writer = QueryLogWriter.of(platform)
    writer.log(
        QueryLogRecord(
            uuid.UUID(project["id"]),
            REGION,
            REGION,
            1,
            "rw",
            1.0,
            1,
            "ok",
            "select \u0000 \ud800",
            dt.datetime.now(dt.UTC),
        )
    )
    post(api, cs, {"query": "SELECT 'after'", "params": []})
    writer.flush()
    assert writer.pending() == 0
    with platform.db.connection() as conn:
        shapes = {
            r[0]
            for r in conn.execute(
                "SELECT fingerprint FROM query_logs WHERE tenant_id = %s", (project["id"],)
            )
        }
    assert "select \\0 \\ud800" in shapes and any("after" in s or "?" in s for s in shapes)


def test_transaction_control_is_refused_however_it_is_spelled(api: Api, project: Any) -> None:
    cs = conn_string(project["connection"])
    for query in (";COMMIT", " ; ;BEGIN", ";copy items to stdout", "/* x */ ROLLBACK"):
        r = post(api, cs, {"query": query, "params": []})
        assert r.status_code == 400 and r.json()["code"] == "0A000", (query, r.text)
        r = api.post(f"/v1/projects/{project['id']}/sql", json={"query": query})
        assert r.status_code == 422, (query, r.text)
    r = post(
        api,
        cs,
        {
            "queries": [
                {"query": "INSERT INTO items VALUES (20, 'a')", "params": []},
                {"query": ";COMMIT", "params": []},
                {"query": "INSERT INTO items VALUES (1, 'dup')", "params": []},
            ]
        },
    )
    assert r.status_code == 400 and r.json()["code"] == "0A000", r.text
    with connect(project["connection"]) as c:
        assert c.execute("SELECT count(*) FROM items").fetchone() == (2,)


def test_a_result_over_the_caps_changes_nothing_whatever_the_statement(
    api: Api, project: Any
) -> None:
    with connect(project["connection"]) as c:
        c.execute("CREATE TABLE big (g int)")
        c.execute(
            "CREATE FUNCTION ins(x int) RETURNS int LANGUAGE sql "
            "AS 'INSERT INTO big VALUES (x) RETURNING x'"
        )
    cs = conn_string(project["connection"])
    for query in (
        "SELECT ins(g) FROM generate_series(1, 6000) g",
        ";INSERT INTO big SELECT g FROM generate_series(1, 6000) g RETURNING *",
        # A word that takes a command out of its transaction, elsewhere.
        "INSERT INTO big SELECT g FROM generate_series(1, 6000) g RETURNING g AS concurrently",
        "UPDATE items SET name = name RETURNING repeat('x', 3000000) AS \"concurrently\"",
    ):
        r = post(api, cs, {"query": query, "params": []})
        assert r.status_code == 400 and r.json()["code"] == "54000", (query, r.text)
        assert "nothing was changed" in r.json()["message"]
    with connect(project["connection"]) as c:
        assert c.execute("SELECT count(*) FROM big").fetchone() == (0,)
        c.execute(
            "CREATE PROCEDURE fill(INOUT r text) LANGUAGE plpgsql AS "
            "$$ BEGIN INSERT INTO big VALUES (7); r := repeat('x', 6000000); END $$"
        )
    # A CALL runs outside a transaction (it may commit): the answer says so.
    r = post(api, cs, {"query": "CALL fill(NULL)", "params": []})
    assert r.status_code == 400 and r.json()["code"] == "54000", r.text
    assert "what it did stands" in r.json()["message"]
    # What cannot run in a transaction block still runs.
    assert post(api, cs, {"query": "VACUUM big", "params": []}).status_code == 200


def test_ro_credentials_cannot_make_a_transaction_read_write(api: Api, project: Any) -> None:
    ro = ro_connection(api, project)
    cs = conn_string(ro)
    for queries in (
        ["SET TRANSACTION READ WRITE", "ALTER ROLE current_user SET work_mem = '1GB'"],
        ["SET TRANSACTION READ WRITE", "ALTER ROLE current_user PASSWORD 'hijacked'"],
    ):
        r = post(api, cs, {"queries": [{"query": q, "params": []} for q in queries]})
        assert r.status_code == 400 and r.json()["code"] in ("25001", "25006"), r.text
    with connect(ro) as c:
        assert c.execute("SHOW work_mem").fetchone() != ("1GB",)
    assert post(api, cs, {"query": "SELECT 1", "params": []}).status_code == 200


def test_failed_logins_lock_out_that_database_only(platform_factory: Any) -> None:
    platform: Platform = platform_factory(api_workers=1, rate_limit_auth_failures_per_min=6)
    _, token = create_owner(platform, "limited")
    with TestClient(create_app(platform)) as client:
        api = Api(client, token)
        mine = create_ok(api, "target", region=REGION)["connection"]
        other = create_ok(api, "bystander", region=REGION)["connection"]
        bad = conn_string(mine, password="wrong")
        codes = [post(api, bad, {"query": "SELECT 1", "params": []}).status_code for _ in range(8)]
        assert codes[:6] == [400] * 6 and codes[6:] == [429, 429], codes
        r = post(api, conn_string(mine), {"query": "SELECT 1", "params": []})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # Another project's app behind the same address goes on, and the
        # address's API token still works.
        ok = post(api, conn_string(other), {"query": "SELECT 1", "params": []})
        assert ok.status_code == 200, ok.text
        assert api.get("/v1/me").status_code == 200


def test_a_transaction_shares_one_timeout(
    api: Api, project: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgfleet.tenants.sql import driver_runner

    monkeypatch.setattr(driver_runner, "DEFAULT_TIMEOUT_MS", 1500)
    cs = conn_string(project["connection"])
    sleep = {"query": "SELECT pg_sleep(0.6)", "params": []}
    assert post(api, cs, {"queries": [sleep, sleep]}).status_code == 200
    r = post(api, cs, {"queries": [sleep, sleep, sleep]})
    assert r.status_code == 400 and r.json()["code"] == "57014", r.text
    assert "statement timeout" in r.json()["message"]


def test_the_end_of_an_overlap_window_is_seen_at_once(api: Api, project: Any) -> None:
    """The old credentials, remembered as verified, stop working as soon as
    the window's expiry has run (its change notice drops them)."""
    cs = conn_string(project["connection"])
    r = api.post(f"/v1/projects/{project['id']}/rotate-password", json={"overlap_s": 1})
    finished(api, r)
    assert post(api, cs, {"query": "SELECT 1", "params": []}).status_code == 200  # remembered
    end = time.monotonic() + 30
    while not any(
        o["type"] == "expire_credentials" and o["status"] == "finished"
        for o in api.get(f"/v1/projects/{project['id']}/operations").json()["operations"]
    ):
        assert time.monotonic() < end, "the overlap window never ended"
        time.sleep(0.1)
    r = post(api, cs, {"query": "SELECT 1", "params": []})
    assert r.status_code == 400 and r.json()["code"] == "28P01", r.text
