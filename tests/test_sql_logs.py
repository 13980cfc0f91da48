"""Query logs of the SQL API and the `pgfleet sql` CLI, on the real fleet."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from pgfleet.monitoring.querylog import QueryLogWriter
from pgfleet.platform.core import Platform
from tests.helpers import (
    Api,
    create_ok,
    invoke,
    run,
    run_ok,
    sql_error,
    tenant_client,
)


def platform_rows(platform: Platform, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with platform.db.connection() as conn:
        return conn.execute(query, params).fetchall()


SECRET = "s3cr3t-param-7f3a9c"


LITERAL = "l1t3ral-9c2e41"


NUMBER = "987654321"


# A distinctive string and number literal in the SQL text itself.
LITERAL_QUERY = "select * from t where s = 'l1t3ral-9c2e41' and id = 987654321"


LITERAL_CAST = "select 'l1t3ral-9c2e41'::int"


def test_query_logs(api: Api, platform: Platform) -> None:
    p = create_ok(api, region="eu-central-1")
    pid = p["id"]
    server_id, hosted = platform_rows(
        platform, "SELECT server_id, hosted_region FROM tenants WHERE id = %s", pid
    )[0]
    assert hosted == "eu-central-1"
    run_ok(api, pid, "create table t (id int, s text)")
    run_ok(api, pid, "insert into t values ($1, $2)", 1, SECRET)
    run_ok(api, pid, LITERAL_QUERY)
    run_ok(api, pid, "select s from t where id in (1, 2, 3)", mode="ro")
    run_ok(api, pid, "select g from generate_series(1, 5) g")
    sql_error(run(api, pid, "select 1/0"))
    sql_error(run(api, pid, LITERAL_CAST))
    sql_error(run(api, pid, "select s from t where s = $1 and 1/0 = 1", SECRET))
    QueryLogWriter.of(platform).flush()

    rows = platform_rows(
        platform,
        "SELECT tenant_id::text, region, hosted_region, server_id, route, execution_time_ms, "
        "row_count, outcome, fingerprint, executed_at FROM query_logs ORDER BY executed_at, id",
    )
    assert len(rows) == 8, rows
    now = dt.datetime.now(dt.UTC)
    for tid, region, hosted_region, sid, _route, ms, _n, _out, _fp, at in rows:
        assert tid == pid
        assert region == "eu-central-1" and hosted_region == "eu-central-1"
        assert sid == server_id
        assert ms > 0
        assert now - dt.timedelta(minutes=5) < at <= now
    assert [(r[4], r[7]) for r in rows] == [
        ("rw", "ok"),
        ("rw", "ok"),
        ("rw", "ok"),
        ("ro", "ok"),
        ("rw", "ok"),
        ("rw", "22012"),
        ("rw", "22P02"),
        ("rw", "22012"),
    ]
    assert [r[6] for r in rows][1:5] == [1, 0, 1, 5]

    # Values never reach the logs, in any column.
    dump = "\n".join(
        r[0] for r in platform_rows(platform, "SELECT to_jsonb(q)::text FROM query_logs q")
    )
    for value in (SECRET, LITERAL, NUMBER, "'"):
        assert value not in dump, value


def test_query_log_fingerprints_and_outcomes(api: Api, platform: Platform) -> None:
    pid = create_ok(api)["id"]
    run_ok(api, pid, "create table t (id int, s text)")
    run_ok(api, pid, "insert into t values ($1, $2)", 1, SECRET)
    run_ok(api, pid, LITERAL_QUERY.upper().replace("FROM", " FROM"))
    run_ok(api, pid, "select s from t where id in (1, 2, 3)", mode="ro")
    run_ok(api, pid, "select g from generate_series(1, 5) g")
    sql_error(run(api, pid, "select 1/0"))
    QueryLogWriter.of(platform).flush()
    got = platform_rows(
        platform,
        "SELECT route, row_count, outcome, fingerprint FROM query_logs ORDER BY executed_at, id",
    )
    assert got == [
        ("rw", 0, "ok", "create table t (id int, s text)"),
        ("rw", 1, "ok", "insert into t values (?)"),  # constant lists collapse
        ("rw", 0, "ok", "select * from t where s = ? and id = ?"),
        ("ro", 1, "ok", "select s from t where id in (?)"),
        ("rw", 5, "ok", "select g from generate_series(?) g"),
        ("rw", None, "22012", "select ?/?"),
    ]


def test_metadata_only_region_logs_requested_and_hosting_region(
    api: Api, platform: Platform
) -> None:
    p = create_ok(api, region="us-west-1")
    assert p["region"] == "us-west-1" and p["hosted_region"] == "us-east-1"
    run_ok(api, p["id"], "select 1")
    run_ok(api, p["id"], "select 2", mode="ro")
    QueryLogWriter.of(platform).flush()
    rows = platform_rows(
        platform,
        "SELECT region, hosted_region, route FROM query_logs WHERE tenant_id = %s ORDER BY route",
        p["id"],
    )
    assert rows == [("us-west-1", "us-east-1", "ro"), ("us-west-1", "us-east-1", "rw")]


def test_get_tenant_connection_logs_only_when_asked(api: Api, platform: Platform) -> None:
    pid = create_ok(api, region="ap-southeast-1")["id"]

    def logged() -> list[tuple[Any, ...]]:
        QueryLogWriter.of(platform).flush()
        return platform_rows(
            platform,
            "SELECT region, hosted_region, route, outcome, row_count, fingerprint "
            "FROM query_logs WHERE tenant_id = %s ORDER BY executed_at, id",
            pid,
        )

    with tenant_client(platform).get_tenant_connection(pid) as conn:
        conn.execute("create table t (id int)")
        conn.execute("insert into t values (%s)", (1,))
        conn.commit()
    assert logged() == []

    with tenant_client(platform).get_tenant_connection(pid, log_queries=True) as conn:
        conn.execute("insert into t values (%s), (%s)", (2, int(NUMBER)))
        with conn.cursor() as cur:
            cur.execute("select id from t where id > %s", (0,))
            assert len(cur.fetchall()) == 3
        conn.commit()
        with pytest.raises(Exception):  # noqa: B017 - any psycopg error
            conn.execute("select 1/0")
        conn.rollback()
    with tenant_client(platform).get_tenant_connection(pid, "ro", log_queries=True) as conn:
        assert conn.execute("select count(*) from t").fetchone() == (3,)
    # Without log_queries again (the pooled connection must not keep logging).
    with tenant_client(platform).get_tenant_connection(pid) as conn:
        conn.execute("select 42")
    with tenant_client(platform).get_tenant_connection(pid, "ro") as conn:
        conn.execute("select 43")

    rows = logged()
    assert rows == [
        ("ap-southeast-1", "ap-southeast-1", "rw", "ok", 2, "insert into t values (?), (?)"),
        ("ap-southeast-1", "ap-southeast-1", "rw", "ok", 3, "select id from t where id > ?"),
        ("ap-southeast-1", "ap-southeast-1", "rw", "22012", None, "select ?/?"),
        ("ap-southeast-1", "ap-southeast-1", "ro", "ok", 1, "select count(*) from t"),
    ]
    dump = "\n".join(
        r[0] for r in platform_rows(platform, "SELECT to_jsonb(q)::text FROM query_logs q")
    )
    assert NUMBER not in dump


@pytest.mark.usefixtures("cli_env")
def test_cli_sql(api: Api, api_url: str) -> None:
    pid = create_ok(api)["id"]
    token = api.token
    res = invoke(api_url, token, "sql", pid, "select 41 + 1 as answer, 'héllo 🐘' as greeting")
    assert res.exit_code == 0, (res.output, res.exception)
    out = res.stdout
    assert "answer" in out and "greeting" in out
    assert "42" in out and "héllo 🐘" in out
    assert "1 row" in out

    res = invoke(api_url, token, "sql", pid, "select $1::text as v", "--param", SECRET)
    assert res.exit_code == 0, res.output
    assert SECRET in res.stdout

    res = invoke(api_url, token, "sql", pid, "select g from generate_series(1, 3) g", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["rows"] == [[1], [2], [3]]
    assert data["columns"][0]["name"] == "g"
    assert data["truncated"] is False and data["row_count"] == 3

    q = "select g from generate_series(1, 9) g"
    res = invoke(api_url, token, "sql", pid, q, "--max-rows", "2")
    assert res.exit_code == 0, res.output
    assert "truncated" in res.stdout

    res = invoke(api_url, token, "sql", pid, "select * from missing_table")
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    err = " ".join(res.stderr.split())
    assert "missing_table" in err and "42P01" in err, err

    res = invoke(api_url, token, "sql", pid, "select 1/0", "--json")
    assert res.exit_code != 0
    assert json.loads(res.stdout)["error"]["sqlstate"] == "22012"
