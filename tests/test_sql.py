"""The SQL API on the real fleet: types, params, roles, read-only escapes,
timeouts, result caps, errors, query logs and the `pgfleet sql` CLI."""

from __future__ import annotations

import base64
import datetime as dt
import json
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.helpers import (
    Api,
    create_ok,
    error_of,
    run,
    run_ok,
    scalar,
    sql_error,
)

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
    # One sentence saying what a parameter may be, not pydantic's four.
    assert "$1 is an " in err["message"] or "$1 is a list" in err["message"], err
    assert "send JSON as text" in err["message"] and ".int" not in err["message"], err


def test_wrong_number_of_params_is_400(api: Api) -> None:
    pid = create_ok(api)["id"]
    r = run(api, pid, "select $1::int, $2::int", 1)
    err = sql_error(r)
    assert err["sqlstate"], err


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
    # On the embedded fleet the SQL API logs in over the server's Unix socket
    # (no TLS handshake per login): no client address; over TCP there is one.
    for mode in ("rw", "ro"):
        assert scalar(api, pid, "select inet_client_addr() is null", mode=mode) is True


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
