"""The SQL API on the real fleet: types, params, roles, read-only escapes,
timeouts, result caps, errors, query logs and the `pgfleet sql` CLI."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner, Result

from pgfleet.api.app import create_app
from pgfleet.auth import create_owner
from pgfleet.cli import app as cli_app
from pgfleet.fleet.embedded import EmbeddedServer
from pgfleet.monitoring.querylog import QueryLogWriter
from pgfleet.platform.core import Platform
from tests.helpers import Api, FleetUnderTest, tenant_client

# ---- helpers -------------------------------------------------------------------


def create_ok(api: Api, name: str = "shop", **kw: Any) -> dict[str, Any]:
    r = api.post("/v1/projects", json={"name": name, **kw})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def run(api: Api, pid: str, query: str, *params: Any, **kw: Any) -> httpx.Response:
    body: dict[str, Any] = {"query": query, **kw}
    if params:
        body["params"] = list(params)
    r: httpx.Response = api.post(f"/v1/projects/{pid}/sql", json=body)
    return r


def run_ok(api: Api, pid: str, query: str, *params: Any, **kw: Any) -> dict[str, Any]:
    r = run(api, pid, query, *params, **kw)
    assert r.status_code == 200, (query, r.status_code, r.text)
    body: dict[str, Any] = r.json()
    return body


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert err["code"] and err["message"], err
    return err


def sql_error(r: httpx.Response) -> dict[str, Any]:
    err = error_of(r, 400)
    assert err["code"] == "sql_error", err
    return err


def scalar(api: Api, pid: str, query: str, *params: Any, **kw: Any) -> Any:
    body = run_ok(api, pid, query, *params, **kw)
    assert len(body["rows"]) == 1 and len(body["rows"][0]) == 1, body
    return body["rows"][0][0]


def platform_rows(platform: Platform, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with platform.db.connection() as conn:
        return conn.execute(query, params).fetchall()


def restart(fleet: FleetUnderTest, server: EmbeddedServer) -> None:
    """Start a server this test stopped, so later tests have the whole fleet."""
    fleet.fleet.start(server)
    assert fleet.fleet.is_running(server)


@contextmanager
def server_down(fleet: FleetUnderTest, region: str) -> Iterator[EmbeddedServer]:
    server = fleet.server(region)
    fleet.fleet.stop(server)
    try:
        assert not fleet.fleet.is_running(server)
        yield server
    finally:
        restart(fleet, server)


# ---- types ---------------------------------------------------------------------


TYPES_QUERY = """
select 42::int4 as i4,
       9007199254740993::int8 as i8,
       1.5::numeric(8,2) as n,
       12345678901234567890.123456789::numeric as big,
       3.25::float8 as f,
       true as b,
       'héllo wörld 🐘✓ 日本'::text as t,
       null::int as nul,
       '2024-02-29 13:45:01.123456+00'::timestamptz as ts,
       '2024-02-29'::date as d,
       '13:45:01.5'::time as tm,
       '\\xdeadbeef00ff'::bytea as bin,
       '{"a": [1, 2.5, {"b": null}], "c": "é🐘", "d": true}'::jsonb as j,
       'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid as u,
       array[1, 2, 3]::int4[] as arr,
       array['x', null, 'y 🐘']::text[] as tarr,
       '1 day 02:03:04'::interval as iv,
       now() as now_ts,
       extract(epoch from now())::text as now_epoch,
       now()::text as now_text
"""

# Each column's PostgreSQL type, as its catalog name or its SQL-standard name.
EXPECTED_TYPES = {
    "i4": {"int4", "integer"},
    "i8": {"int8", "bigint"},
    "n": {"numeric(8,2)"},
    "big": {"numeric"},
    "f": {"float8", "double precision"},
    "b": {"bool", "boolean"},
    "t": {"text"},
    "nul": {"int4", "integer"},
    "ts": {"timestamptz", "timestamp with time zone"},
    "d": {"date"},
    "tm": {"time", "time without time zone"},
    "bin": {"bytea"},
    "j": {"jsonb"},
    "u": {"uuid"},
    "arr": {"int4[]", "integer[]"},
    "tarr": {"text[]"},
    "iv": {"interval"},
}


def test_types_round_trip(api: Api) -> None:
    pid = create_ok(api)["id"]
    body = run_ok(api, pid, TYPES_QUERY)
    names = [c["name"] for c in body["columns"]]
    assert names == [*EXPECTED_TYPES, "now_ts", "now_epoch", "now_text"]
    types = {c["name"]: c["type"] for c in body["columns"]}
    for name, allowed in EXPECTED_TYPES.items():
        assert types[name] in allowed, (name, types[name])
    assert body["row_count"] == 1 and body["truncated"] is False
    assert body["command"].startswith("SELECT")
    row = dict(zip(names, body["rows"][0], strict=True))

    assert row["i4"] == 42 and type(row["i4"]) is int
    assert row["i8"] == 9007199254740993 and type(row["i8"]) is int
    assert row["n"] == "1.50"
    assert Decimal(row["big"]) == Decimal("12345678901234567890.123456789")
    assert row["big"] == "12345678901234567890.123456789"
    assert row["f"] == 3.25 and isinstance(row["f"], float)
    assert row["b"] is True
    assert row["t"] == "héllo wörld 🐘✓ 日本"
    assert row["nul"] is None

    ts = dt.datetime.fromisoformat(row["ts"])
    assert ts.tzinfo is not None
    assert ts == dt.datetime(2024, 2, 29, 13, 45, 1, 123456, tzinfo=dt.UTC)
    assert dt.date.fromisoformat(row["d"]) == dt.date(2024, 2, 29)
    assert dt.time.fromisoformat(row["tm"]) == dt.time(13, 45, 1, 500000)
    # The server's own now(), to the microsecond.
    now = dt.datetime.fromisoformat(row["now_ts"])
    assert now.tzinfo is not None
    assert Decimal(str(now.timestamp())).quantize(Decimal("0.000001")) == Decimal(
        row["now_epoch"]
    ).quantize(Decimal("0.000001"))
    assert abs(now - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)

    assert base64.b64decode(row["bin"], validate=True) == bytes.fromhex("deadbeef00ff")
    assert row["j"] == {"a": [1, 2.5, {"b": None}], "c": "é🐘", "d": True}
    assert row["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert row["arr"] == [1, 2, 3]
    assert row["tarr"] == ["x", None, "y 🐘"]
    assert isinstance(row["iv"], str) and row["iv"]


def test_values_round_trip_through_a_table(api: Api) -> None:
    """What goes in as JSON comes back out the same, through real columns."""
    pid = create_ok(api)["id"]
    run_ok(
        api,
        pid,
        "create table items (id int primary key, price numeric(10,2), at timestamptz, "
        "blob bytea, doc jsonb, tags text[], note text)",
    )
    at = "2023-11-05T08:09:10.654321+00:00"
    blob = base64.b64encode(b"\x00\x01binary\xff").decode()
    ins = run_ok(
        api,
        pid,
        "insert into items values ($1, $2::numeric, $3::timestamptz, decode($4, 'base64'), "
        "$5::jsonb, string_to_array($6, ','), $7)",
        1,
        "19.90",
        at,
        blob,
        json.dumps({"k": ["v", 1]}),
        "a,b",
        "Grüße 🐘",
    )
    assert ins["row_count"] == 1
    assert ins["command"] == "INSERT 0 1"
    assert ins["columns"] == [] and ins["rows"] == []
    got = run_ok(api, pid, "select price, at, blob, doc, tags, note from items where id = 1")
    price, at_out, blob_out, doc, tags, note = got["rows"][0]
    assert price == "19.90"
    assert dt.datetime.fromisoformat(at_out) == dt.datetime.fromisoformat(at)
    assert blob_out == blob
    assert doc == {"k": ["v", 1]}
    assert tags == ["a", "b"]
    assert note == "Grüße 🐘"
    # Feeding the returned values back in as params matches the stored row.
    again = run_ok(
        api,
        pid,
        "select count(*) from items where price = $1::numeric and at = $2::timestamptz "
        "and blob = decode($3, 'base64') and doc = $4::jsonb and note = $5",
        price,
        at_out,
        blob_out,
        json.dumps(doc),
        note,
    )
    assert again["rows"] == [[1]]


INTERVALS = ("1 day 02:03:04", "1 year", "1 mon", "-1 mon 3 days 04:05:06.5", "00:00:00.000001")


def test_intervals_round_trip(api: Api) -> None:
    """An interval comes back as a string that PostgreSQL reads as the same
    interval: months, days and time kept apart (a month is not 30 days)."""
    pid = create_ok(api)["id"]
    for iv in INTERVALS:
        out = scalar(api, pid, "select $1::interval", iv)
        assert isinstance(out, str) and out, (iv, out)
        same = scalar(
            api,
            pid,
            "select ($1::interval)::text = ($2::interval)::text "
            "and date '2024-01-31' + $1::interval = date '2024-01-31' + $2::interval",
            out,
            iv,
        )
        assert same is True, (iv, out)


def test_infinite_and_out_of_range_values_are_returned(api: Api) -> None:
    """Valid PostgreSQL values that Python's datetime cannot hold still come
    back (as the server writes them), not as a failed statement."""
    pid = create_ok(api)["id"]
    r = run(
        api,
        pid,
        "select 'infinity'::timestamptz as a, '-infinity'::date as b, "
        "'NaN'::numeric as c, 'NaN'::float8 as d",
    )
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == [["infinity", "-infinity", "NaN", "NaN"]]


def test_user_defined_type_is_named_not_numbered(api: Api) -> None:
    """`type` is the PostgreSQL type name for any type, not only the ones
    psycopg knows: an enum shows `mood`, not its OID."""
    pid = create_ok(api)["id"]
    run_ok(api, pid, "create type mood as enum ('ok', 'sad')")
    oid = scalar(api, pid, "select 'mood'::regtype::oid::int")
    body = run_ok(api, pid, "select 'ok'::mood as m")
    assert body["rows"] == [["ok"]]
    assert body["columns"][0]["type"] != str(oid), body["columns"]
    assert body["columns"][0]["type"] == "mood", body["columns"]


# ---- params --------------------------------------------------------------------


INJECTION = "'); drop table t; --"


def test_params(api: Api) -> None:
    pid = create_ok(api)["id"]
    run_ok(api, pid, "create table t (id serial primary key, s text, n int, b bool)")
    r = run_ok(
        api, pid, "insert into t (s, n, b) values ($1, $2, $3) returning id", "hello", 5, True
    )
    assert r["rows"] == [[1]] and r["row_count"] == 1
    r = run_ok(api, pid, "insert into t (s, n, b) values ($1, $2, $3)", None, None, False)
    assert r["row_count"] == 1
    r = run_ok(api, pid, "insert into t (s) values ($1)", INJECTION)
    assert r["row_count"] == 1
    rows = run_ok(api, pid, "select id, s, n, b from t order by id")["rows"]
    assert rows == [[1, "hello", 5, True], [2, None, None, False], [3, INJECTION, None, None]]
    # The table survived and the value matches itself as a parameter.
    assert scalar(api, pid, "select id from t where s = $1", INJECTION) == 3
    assert scalar(api, pid, "select count(*) from t where n is null and s is null") == 1

    assert scalar(api, pid, "select $1::int + $2::int", 40, 2) == 42
    assert scalar(api, pid, "select $1::float8 * 2", 1.25) == 2.5
    assert scalar(api, pid, "select $1::bool and not $2::bool", True, False) is True
    assert scalar(api, pid, "select $1::text is null", None) is True
    assert scalar(api, pid, "select $1::text", "日本 🐘") == "日本 🐘"


def test_percent_signs_with_and_without_params(api: Api) -> None:
    pid = create_ok(api)["id"]
    assert scalar(api, pid, "select 'abc' like 'a%'") is True
    assert scalar(api, pid, "select 'abc' like 'b%'") is False
    assert scalar(api, pid, "select $1::text like 'a%'", "abc") is True
    assert scalar(api, pid, "select $1::text like 'a%'", "xbc") is False
    assert scalar(api, pid, "select '100%s' || $1::text", "!") == "100%s!"
    assert scalar(api, pid, "select '%(name)s %% %s'") == "%(name)s %% %s"


@pytest.mark.parametrize("bad", [{"a": 1}, [1, 2], [{"a": 1}]])
def test_object_or_list_params_are_422(api: Api, bad: Any) -> None:
    pid = create_ok(api)["id"]
    r = api.post(f"/v1/projects/{pid}/sql", json={"query": "select $1", "params": [bad]})
    err = error_of(r, 422)
    assert "params" in err["message"], err


def test_wrong_number_of_params_is_400(api: Api) -> None:
    pid = create_ok(api)["id"]
    r = run(api, pid, "select $1::int, $2::int", 1)
    err = sql_error(r)
    assert err["sqlstate"], err


# ---- roles ---------------------------------------------------------------------


def test_runs_as_the_projects_own_role(api: Api) -> None:
    created = create_ok(api)
    pid = created["id"]
    rw_user = created["connection"]["user"]
    assert rw_user.startswith("tenant_") and rw_user.endswith("_rw"), rw_user
    ro = api.get(f"/v1/projects/{pid}/connection", params={"mode": "ro"})
    assert ro.status_code == 200, ro.text
    ro_user = ro.json()["user"]
    assert ro_user.startswith("tenant_") and ro_user.endswith("_ro"), ro_user

    q = "select current_user::text, session_user::text, current_database()::text"
    rows = run_ok(api, pid, q)["rows"]
    # session_user too: logged in as the role, not an admin that SET ROLEs.
    assert rows == [[rw_user, rw_user, created["connection"]["database"]]]
    rows = run_ok(api, pid, q, mode="ro")["rows"]
    assert rows == [[ro_user, ro_user, created["connection"]["database"]]]
    assert scalar(api, pid, "select rolsuper from pg_roles where rolname = current_user") is False
    assert scalar(api, pid, "select current_setting('transaction_read_only')", mode="ro") == "on"


# ---- read-only mode ------------------------------------------------------------


def _refused(r: httpx.Response) -> dict[str, Any]:
    err = sql_error(r)
    assert err["sqlstate"], err
    return err


def test_ro_cannot_change_anything(api: Api) -> None:
    pid = create_ok(api)["id"]
    run_ok(api, pid, "create table t (id int)")
    run_ok(api, pid, "insert into t values (1), (2)")
    run_ok(api, pid, "create sequence s")
    run_ok(
        api,
        pid,
        "create function f() returns int language sql as 'insert into t values (100) returning 1'",
    )
    run_ok(
        api,
        pid,
        "create function g() returns int language sql security definer "
        "as 'insert into t values (200) returning 1'",
    )

    def count() -> int:
        n: int = scalar(api, pid, "select count(*) from t")
        return n

    def ro(query: str) -> httpx.Response:
        return run(api, pid, query, mode="ro")

    assert scalar(api, pid, "select count(*) from t", mode="ro") == 2

    # A plain write.
    _refused(ro("insert into t values (3)"))
    _refused(ro("update t set id = 9"))
    _refused(ro("delete from t"))
    _refused(ro("truncate t"))

    def then_writes_refused(*setup: str) -> None:
        """Whatever `setup` does (each a call of its own), later calls cannot
        write: neither directly nor through g(), which writes with the rw
        role's rights, so only a read-only transaction stops it."""
        for q in setup:
            ro(q)
        _refused(ro("insert into t values (3)"))
        _refused(ro("select g()"))

    # Asking for a read-write transaction, then writing in the next call.
    then_writes_refused("set transaction read write")
    then_writes_refused("begin read write")
    then_writes_refused("begin", "set transaction read write")
    then_writes_refused("start transaction read write")
    then_writes_refused("set session characteristics as transaction read write")
    # One call cannot hold several statements.
    for q in (
        "begin read write; insert into t values (6); commit",
        "commit; insert into t values (7)",
        "rollback; insert into t values (7)",
        "commit; select g()",
    ):
        r = ro(q)
        if r.status_code == 422:  # transaction control is refused before it runs
            assert "not available through the SQL API" in r.json()["error"]["message"]
        else:
            err = _refused(r)
            assert err["sqlstate"] == "42601", err
    then_writes_refused("commit")

    # Session settings do not carry over to later calls.
    then_writes_refused("set default_transaction_read_only = off")
    then_writes_refused("select set_config('default_transaction_read_only', 'off', false)")
    then_writes_refused("set transaction_read_only = off")
    then_writes_refused("set default_transaction_read_only = off", "begin")
    then_writes_refused("reset all")
    then_writes_refused("reset role")
    then_writes_refused("discard all")
    then_writes_refused("alter role current_user set default_transaction_read_only = off")
    # Switching the transaction read-write and writing in the same statement.
    _refused(ro("select set_config('transaction_read_only', 'off', true), g()"))
    _refused(ro("select set_config('transaction_read_only', 'off', false) as a, f() as b"))
    _refused(ro("select set_config('default_transaction_read_only', 'off', false), g()"))
    _refused(
        ro(
            "with x as (select set_config('transaction_read_only', 'off', true)) "
            "insert into t select 11 from x"
        )
    )
    _refused(
        ro(
            "do $$ begin perform set_config('transaction_read_only', 'off', true); "
            "perform g(); end $$"
        )
    )

    # Functions with side effects, including one running with its owner's rights.
    _refused(ro("select f()"))
    _refused(ro("select g()"))
    _refused(ro("do $$ begin insert into t values (13); end $$"))
    _refused(ro("select nextval('s')"))

    # Nothing new at all: no temp tables, no DDL.
    _refused(ro("create temp table tt (x int)"))
    _refused(ro("create table t2 (x int)"))
    _refused(ro("drop table t"))
    _refused(ro("alter table t add column y int"))
    _refused(ro("create function h() returns int language sql as 'select 1'"))

    assert count() == 2
    assert run_ok(api, pid, "select id from t order by id")["rows"] == [[1], [2]]
    assert scalar(api, pid, "select last_value from s") == 1
    assert scalar(api, pid, "select is_called from s") is False
    assert scalar(api, pid, "select count(*) from pg_class where relname in ('t2', 'tt')") == 0
    # The rw route still writes (the refusals above were not a broken project).
    run_ok(api, pid, "insert into t values (3)")
    assert count() == 3


# ---- timeouts ------------------------------------------------------------------


def _canceled(r: httpx.Response, elapsed: float, limit_s: float) -> None:
    err = sql_error(r)
    assert err["sqlstate"] == "57014", err
    assert elapsed < limit_s, elapsed


def timed(api: Api, pid: str, query: str, **kw: Any) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = run(api, pid, query, **kw)
    return r, time.monotonic() - t0


def test_timeout_cancels_the_statement(api: Api) -> None:
    pid = create_ok(api)["id"]
    r, elapsed = timed(api, pid, "select pg_sleep(5)", timeout_ms=300)
    _canceled(r, elapsed, 2.0)
    assert "300" in sql_error(r)["message"]
    # The project's connection is fine afterwards.
    assert scalar(api, pid, "select 1", timeout_ms=300) == 1
    r, elapsed = timed(api, pid, "select pg_sleep(5)", timeout_ms=300, mode="ro")
    _canceled(r, elapsed, 2.0)


def test_statement_timeout_cannot_be_escaped(api: Api) -> None:
    pid = create_ok(api)["id"]
    run(api, pid, "set statement_timeout = 0")
    r, elapsed = timed(api, pid, "select pg_sleep(2)", timeout_ms=300)
    _canceled(r, elapsed, 1.5)

    r, elapsed = timed(
        api, pid, "select set_config('statement_timeout', '0', false), pg_sleep(3)", timeout_ms=300
    )
    _canceled(r, elapsed, 2.0)

    r, elapsed = timed(
        api,
        pid,
        "do $$ begin perform set_config('statement_timeout', '0', true); "
        "perform pg_sleep(3); end $$",
        timeout_ms=300,
    )
    _canceled(r, elapsed, 2.0)

    # Role and database defaults the tenant may set for itself do not help either.
    run(api, pid, "alter role current_user set statement_timeout = 0")
    r, elapsed = timed(api, pid, "select pg_sleep(2)", timeout_ms=300)
    _canceled(r, elapsed, 1.5)


def test_a_statement_that_swallows_its_cancel_is_ended(api: Api, fleet: FleetUnderTest) -> None:
    """PL/pgSQL can catch the cancel (query_canceled) and carry on: a second
    after the timeout its session is terminated, and the answer is still a
    57014 in bounded time."""
    pid = create_ok(api)["id"]
    stubborn = (
        "do $$ begin loop begin perform pg_sleep(30); "
        "exception when query_canceled then null; end; end loop; end $$"
    )
    for mode in ("rw", "ro"):
        r, elapsed = timed(api, pid, stubborn, timeout_ms=300, mode=mode)
        _canceled(r, elapsed, 4.0)
        assert "session was ended" in sql_error(r)["detail"]
        # Nothing of it keeps running on the server, and the next call works.
        assert scalar(api, pid, "select 1") == 1
    with fleet.admin_conn("us-east-1") as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%query_canceled%' "
            "AND pid <> pg_backend_pid()"
        ).fetchone()
    assert left == (0,)


def test_a_truncated_write_still_happens_whole(api: Api) -> None:
    """Rows of INSERT ... RETURNING past max_rows are read and dropped, not
    cancelled: the answer is truncated, the write is not."""
    pid = create_ok(api)["id"]
    run_ok(api, pid, "create table w (n int)")
    body = run_ok(
        api, pid, "insert into w select g from generate_series(1, 50) g returning n", max_rows=3
    )
    assert body["truncated"] is True
    assert body["rows"] == [[1], [2], [3]]
    assert body["row_count"] == 50
    assert scalar(api, pid, "select count(*) from w") == 50
    body = run_ok(
        api,
        pid,
        "with d as (delete from w where n > 10 returning n) select n from d order by n",
        max_rows=1,
    )
    assert body["truncated"] is True and body["row_count"] == 40
    assert scalar(api, pid, "select count(*) from w") == 10
    # A read stops early, and says so.
    body = run_ok(api, pid, "select g from generate_series(1, 100000) g", max_rows=5)
    assert body["truncated"] is True and body["row_count"] == 5


def test_busy_project_is_429_not_a_down_region(platform_factory: Any) -> None:
    platform: Platform = platform_factory(api_workers=1, tenant_pool_size=1, connect_timeout_s=1)
    _, token = create_owner(platform, "busy")
    with TestClient(create_app(platform)) as client:
        api = Api(client, token)
        pid = create_ok(api, "busy", plan_type="pro")["id"]
        assert client.app.state.sql.pool_size("pro") == 1  # type: ignore[attr-defined]
        with ThreadPoolExecutor(2) as ex:
            slow = ex.submit(run, api, pid, "select pg_sleep(2.5)")
            time.sleep(0.5)
            busy = run(api, pid, "select 1")
            assert slow.result().status_code == 200
        err = error_of(busy, 429)
        assert err["code"] == "too_many_statements" and err["limit"] == 1, err
        # The pool was kept: the project answers at once afterwards.
        assert scalar(api, pid, "select 1") == 1


def test_sql_pool_sizes_leave_the_project_half_its_connections(platform_factory: Any) -> None:
    platform: Platform = platform_factory(api_workers=2, tenant_pool_size=4)
    from pgfleet.tenants.sql import SqlGateway

    g = SqlGateway(platform)
    assert g.pool_size("free") == 2  # 10 connections: 5 for the API, over 2 processes
    assert g.pool_size("pro") == 4
    assert g.pool_size("enterprise") == 4


def test_a_plan_change_resizes_the_projects_sql_pool(platform_factory: Any) -> None:
    platform: Platform = platform_factory(api_workers=2, tenant_pool_size=4)
    _, token = create_owner(platform, "grows")
    with TestClient(create_app(platform)) as client:
        api = Api(client, token)
        pid = create_ok(api, "grows", plan_type="free")["id"]
        pools = client.app.state.sql._pools  # type: ignore[attr-defined]

        def size() -> int:
            run_ok(api, pid, "select 1")
            (entry,) = [e for (t, _), e in pools._pools.items() if str(t) == pid]
            return int(entry.pool.max_size)

        assert size() == 2
        r = api.post(f"/v1/projects/{pid}/plan", json={"plan": "pro"})
        assert r.status_code == 200, r.text
        assert until(lambda: size() == 4)


def test_malformed_and_oversized_bodies_are_4xx(api: Api) -> None:
    pid = create_ok(api, "bodies")["id"]
    deep = b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = api.post(
        f"/v1/projects/{pid}/sql", content=deep, headers={"Content-Type": "application/json"}
    )
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    huge = {"query": "select $1", "params": ["x" * (5 * 1024 * 1024)]}
    r = api.post(f"/v1/projects/{pid}/sql", json=huge)
    assert r.status_code == 413, (r.status_code, r.text[:200])


@pytest.mark.parametrize("timeout_ms", [15001, 60000, 0, -5])
def test_timeout_outside_the_plan_is_422(api: Api, timeout_ms: int) -> None:
    pid = create_ok(api, plan_type="free")["id"]
    err = error_of(run(api, pid, "select 1", timeout_ms=timeout_ms), 422)
    assert "timeout_ms" in err["message"] and "15000" in err["message"], err


def test_plan_limits_are_per_plan(api: Api) -> None:
    free = create_ok(api, "free", plan_type="free")["id"]
    pro = create_ok(api, "pro", plan_type="pro")["id"]
    error_of(run(api, free, "select 1", timeout_ms=20000), 422)
    body = run_ok(api, pro, "select 1", timeout_ms=20000)
    assert body["limits"]["timeout_ms"] == 20000
    assert body["limits"]["plan_max_timeout_ms"] == 60000
    error_of(run(api, free, "select 1", max_rows=6000), 422)
    assert run_ok(api, pro, "select 1", max_rows=6000)["rows"] == [[1]]
    err = error_of(run(api, pro, "select 1", timeout_ms=60001), 422)
    assert "60000" in err["message"], err


# ---- result caps ---------------------------------------------------------------


def test_max_rows_truncates(api: Api) -> None:
    pid = create_ok(api)["id"]
    body = run_ok(api, pid, "select g from generate_series(1, 50) g", max_rows=10)
    assert body["rows"] == [[i] for i in range(1, 11)]
    assert body["truncated"] is True
    assert body["row_count"] == 10

    body = run_ok(api, pid, "select g from generate_series(1, 50) g", max_rows=50)
    assert len(body["rows"]) == 50 and body["truncated"] is False

    body = run_ok(api, pid, "select g from generate_series(1, 1500) g")
    assert len(body["rows"]) == 1000 and body["truncated"] is True
    assert body["rows"][-1] == [1000]
    assert body["row_count"] == 1000


def test_limits_report_the_effective_caps(api: Api) -> None:
    pid = create_ok(api)["id"]
    limits = run_ok(api, pid, "select 1", max_rows=10, timeout_ms=500)["limits"]
    assert limits["timeout_ms"] == 500
    assert limits["max_rows"] == 10, limits  # the cap this call used, not the plan's


@pytest.mark.parametrize("max_rows", [5001, -1])
def test_max_rows_outside_the_plan_is_422(api: Api, max_rows: int) -> None:
    pid = create_ok(api, plan_type="free")["id"]
    err = error_of(run(api, pid, "select 1", max_rows=max_rows), 422)
    assert "max_rows" in err["message"] and "5000" in err["message"], err


def test_byte_cap_truncates(api: Api) -> None:
    pid = create_ok(api, plan_type="free")["id"]
    body = run_ok(api, pid, "select g, repeat('x', 1000000) from generate_series(1, 10) g")
    assert body["truncated"] is True
    assert 1 <= len(body["rows"]) < 10
    assert [r[0] for r in body["rows"]] == list(range(1, len(body["rows"]) + 1))
    assert all(len(r[1]) == 1_000_000 for r in body["rows"])
    assert len(json.dumps(body["rows"])) <= 5 * 1024 * 1024
    assert body["row_count"] == len(body["rows"])


# ---- errors --------------------------------------------------------------------


def test_statement_errors_are_400_with_sqlstate(api: Api) -> None:
    pid = create_ok(api)["id"]
    err = sql_error(run(api, pid, "select 1 from where"))
    assert err["sqlstate"] == "42601"
    assert err["position"] == len("select 1 from ") + 1
    assert "syntax error" in err["message"]

    q = "select '🐘日本' as x from missing_table"
    err = sql_error(run(api, pid, q))
    assert err["sqlstate"] == "42P01"
    assert "missing_table" in err["message"]
    assert err["position"] == q.index("missing_table") + 1  # characters, 1-based

    err = sql_error(run(api, pid, "select 1/0"))
    assert err["sqlstate"] == "22012"

    run_ok(api, pid, "create table u (id int primary key)")
    run_ok(api, pid, "insert into u values (1)")
    err = sql_error(run(api, pid, "insert into u values (1)"))
    assert err["sqlstate"] == "23505"
    assert err["detail"] and "(id)=(1)" in err["detail"], err

    err = sql_error(run(api, pid, "select 'abc'::int"))
    assert err["sqlstate"] == "22P02"
    err = sql_error(run(api, pid, "selec 1"))
    assert err["sqlstate"] == "42601" and err["position"] == 1
    # The project keeps working after its errors.
    assert scalar(api, pid, "select count(*) from u") == 1


def test_empty_query_is_422(api: Api) -> None:
    pid = create_ok(api)["id"]
    error_of(run(api, pid, "   "), 422)
    error_of(api.post(f"/v1/projects/{pid}/sql", json={"query": "select 1", "mode": "rx"}), 422)


def test_down_server_is_503_naming_the_region(api: Api, fleet: FleetUnderTest) -> None:
    pid = create_ok(api, region="eu-central-1")["id"]
    with server_down(fleet, "eu-central-1"):
        err = error_of(run(api, pid, "select 1"), 503)
        assert "eu-central-1" in err["message"], err
        assert err["code"] == "region_unavailable"
    assert scalar(api, pid, "select 1") == 1


def test_down_server_after_use_is_503(api: Api, fleet: FleetUnderTest) -> None:
    """A project that already ran SQL (so its pool holds connections) also
    gets 503 naming the region when its server goes down, not a 400."""
    pid = create_ok(api, region="eu-central-1")["id"]
    assert scalar(api, pid, "select 1") == 1
    assert scalar(api, pid, "select 1", mode="ro") == 1
    with server_down(fleet, "eu-central-1"):
        for mode in ("rw", "ro"):
            err = error_of(run(api, pid, "select 1", mode=mode), 503)
            assert "eu-central-1" in err["message"], err
    assert scalar(api, pid, "select 1") == 1


def test_deleted_foreign_and_paused_projects(
    api: Api, client: TestClient, platform: Platform
) -> None:
    gone = create_ok(api, "gone")["id"]
    r = api.delete(f"/v1/projects/{gone}")
    assert r.status_code == 200, r.text
    error_of(run(api, gone, "select 1"), 404)

    error_of(run(api, str(uuid.uuid4()), "select 1"), 404)
    error_of(run(api, "not-a-uuid", "select 1"), 404)

    mine = create_ok(api, "mine")["id"]
    _, bob_token = create_owner(platform, "bob")
    bob = Api(client, bob_token)
    err = error_of(run(bob, mine, "select 1"), 404)
    assert err["code"] == "project_not_found"

    with platform.db.connection() as conn:
        conn.execute("UPDATE tenants SET status = 'paused' WHERE id = %s", (mine,))
    err = error_of(run(api, mine, "select 1"), 409)
    assert "paused" in err["message"], err


def until(check: Any, seconds: float = 2.0) -> Any:
    """Poll `check` until it returns something truthy (a change notice is
    asynchronous: it arrives just after the commit)."""
    end = time.monotonic() + seconds
    while True:
        result = check()
        if result or time.monotonic() > end:
            return result
        time.sleep(0.01)


def test_auth_cache_serves_repeats_and_follows_every_change(
    api: Api, client: TestClient, platform: Platform
) -> None:
    """The SQL API keeps (token, project) lookups for a few seconds; a
    revoked token, a paused project and a rotated password take effect as
    soon as their change notice arrives."""
    cache = client.app.state.sql.auth_cache  # type: ignore[attr-defined]
    assert until(lambda: cache.live), "the LISTEN for change notices never came up"
    pid = create_ok(api, "cached")["id"]
    r = api.post("/v1/tokens", json={"name": "short-lived"})
    assert r.status_code == 201, r.text
    token = r.json()
    other = Api(client, token["token"])
    run_ok(other, pid, "select 1")
    hits = cache.hits
    run_ok(other, pid, "select 1")
    assert cache.hits == hits + 1, "the repeat lookup did not come from the cache"

    assert api.delete(f"/v1/tokens/{token['id']}").status_code in (200, 204)
    refused = until(lambda: run(other, pid, "select 1").status_code == 401)
    assert refused, "a revoked token kept working from the cache"

    # A change made by another process (here: straight in the platform DB).
    run_ok(api, pid, "select 1")
    run_ok(api, pid, "select 1")
    with platform.db.connection() as conn:
        conn.execute("UPDATE tenants SET status = 'paused' WHERE id = %s", (pid,))
    assert until(lambda: run(api, pid, "select 1").status_code == 409)
    with platform.db.connection() as conn:
        conn.execute("UPDATE tenants SET status = 'active' WHERE id = %s", (pid,))
    assert until(lambda: run(api, pid, "select 1").status_code == 200)


def test_auth_cache_is_off_while_its_listen_connection_is_down(
    api: Api, client: TestClient, platform: Platform
) -> None:
    gateway = client.app.state.sql  # type: ignore[attr-defined]
    cache = gateway.auth_cache
    assert until(lambda: cache.live)
    gateway.listen_retry_s = 3.0  # so the test sees the time without notices
    pid = create_ok(api, "listen")["id"]
    run_ok(api, pid, "select 1")
    with platform.db.connection() as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'pgfleet-auth-listen'"
        ).fetchall()
    assert killed, "no listen connection found"
    assert until(lambda: not cache.live), "the cache stayed on without its notices"
    assert len(cache) == 0
    hits = cache.hits
    run_ok(api, pid, "select 1")
    run_ok(api, pid, "select 1")
    # Served, but not from the cache: nothing would tell it about changes.
    assert not cache.live and cache.hits == hits
    assert until(lambda: cache.live, 5.0), "the listen connection did not come back"


def test_sql_requests_the_fast_path_hands_to_the_route(api: Api) -> None:
    """Bodies that do not validate, or are not JSON, get FastAPI's own answers."""
    pid = create_ok(api, "fallback")["id"]
    r = api.post(f"/v1/projects/{pid}/sql", json={"query": 5})
    err = error_of(r, 422)
    assert err["fields"] == ["query"], err
    r = api.post(f"/v1/projects/{pid}/sql", json={"query": "select 1", "mode": "rx"})
    assert error_of(r, 422)["fields"] == ["mode"]
    r = api.post(
        f"/v1/projects/{pid}/sql",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    r = api.post(
        f"/v1/projects/{pid}/sql",
        content=b'{"query": "select 1"}',
        headers={"Content-Type": "text/plain"},
    )
    assert r.status_code in (415, 422), r.text
    # Without a token, or with another scheme: the same 401 as every route.
    r = api.client.post(f"/v1/projects/{pid}/sql", json={"query": "select 1"})
    assert error_of(r, 401)["code"] == "not_authenticated"
    r = api.client.post(
        f"/v1/projects/{pid}/sql",
        json={"query": "select 1"},
        headers={"Authorization": f"Basic {api.token}"},
    )
    assert error_of(r, 401)["code"] == "not_authenticated"
    # An Idempotency-Key takes the route: the second call answers from the first.
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    run_ok(api, pid, "create table once (n int)")
    first = api.post(
        f"/v1/projects/{pid}/sql", json={"query": "insert into once values (1)"}, headers=key
    )
    again = api.post(
        f"/v1/projects/{pid}/sql", json={"query": "insert into once values (1)"}, headers=key
    )
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert first.json() == again.json()
    assert scalar(api, pid, "select count(*) from once") == 1


def test_sql_api_connections_stay_bounded_across_many_projects(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    """With more projects than the pool cap, the least recently used idle
    pools close: the server never sees more than cap x size connections."""
    cap, size = 2, 1
    platform: Platform = platform_factory(tenant_pool_cap=cap, tenant_pool_size=size, api_workers=1)
    _, token = create_owner(platform, "many")
    with TestClient(create_app(platform)) as client:
        api = Api(client, token)
        pids = [create_ok(api, f"p{i}")["id"] for i in range(5)]
        users = [api.get(f"/v1/projects/{p}/connection").json()["user"] for p in pids]
        for _ in range(2):
            for pid in pids:
                assert scalar(api, pid, "select current_user") in users
                assert len(client.app.state.sql._pools) <= cap  # type: ignore[attr-defined]
        deadline = time.monotonic() + 5
        while (n := backends(fleet, users)) > cap * size:
            assert time.monotonic() < deadline, f"{n} tenant backends, more than {cap * size}"
            time.sleep(0.05)


def backends(fleet: FleetUnderTest, users: list[str]) -> int:
    with fleet.admin_conn("us-east-1") as a:
        row = a.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = ANY(%s)", (users,)
        ).fetchone()
    assert row is not None
    return int(row[0])


# ---- query logs ----------------------------------------------------------------

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


# ---- the CLI -------------------------------------------------------------------


def invoke(url: str, token: str, *args: str) -> Result:
    argv = [*args, "--url", url, "--token", token]
    return CliRunner().invoke(cli_app, argv, env={"COLUMNS": "250"})


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
