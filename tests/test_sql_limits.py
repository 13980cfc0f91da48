"""The SQL API's limits on the real fleet: statement timeouts that cannot be
escaped, per-project pool sizes, plan limits, row and byte caps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from psycopg_pool import PoolTimeout

from pgfleet.api.app import create_app
from pgfleet.auth import create_owner
from pgfleet.platform.core import Platform
from tests.helpers import (
    Api,
    FleetUnderTest,
    create_ok,
    error_of,
    run,
    run_ok,
    scalar,
    sql_error,
    until,
)


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


def test_a_cold_projects_burst_keeps_to_its_most_statements_at_once(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    """A project's first statement runs on a connection of its own; the
    ones that arrive while it runs wait for room beside it, as they wait for
    a pool's connection: never more at once than the project's most, and
    none refused for waiting."""
    platform: Platform = platform_factory(api_workers=1, tenant_pool_size=2)
    _, token = create_owner(platform, "burst")
    with TestClient(create_app(platform)) as client:
        api = Api(client, token)
        pid = create_ok(api, "burst", plan_type="pro")["id"]
        user = api.get(f"/v1/projects/{pid}/connection").json()["user"]
        assert client.app.state.sql.pool_size("pro") == 2  # type: ignore[attr-defined]
        peak, done = 0, threading.Event()

        def watch() -> None:
            nonlocal peak
            with fleet.admin_conn("us-east-1") as a:
                while not done.is_set():
                    row = a.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE usename = %s AND state = 'active'",
                        (user,),
                    ).fetchone()
                    peak = max(peak, row[0] if row else 0)
                    time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with ThreadPoolExecutor(6) as ex:
                answers = list(ex.map(lambda _: run(api, pid, "select pg_sleep(0.4)"), range(6)))
        finally:
            done.set()
            watcher.join()
        assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
        assert 1 <= peak <= 2, f"{peak} statements at once, the most is 2"


def test_a_pool_wait_that_ran_out_is_told_from_a_refused_login(api: Api) -> None:
    """A wait for a busy pool can end just as the last running statement
    hands its connection back (nothing checked out then: found by an attack
    with 12 x pg_sleep(1) on one project through two API processes, 1 answer
    in 48 was 409 credentials_rejected). What tells the two apart is the
    pool's own record: connections held and no failed login."""
    from pgfleet.pooling import swept_async_pool
    from pgfleet.tenants.sql.gateway import _only_waited

    c = api.get(f"/v1/projects/{create_ok(api, 'waits')['id']}/connection").json()
    info = {
        "host": c["host"],
        "port": c["port"],
        "dbname": c["database"],
        "user": c["user"],
        "sslmode": c["sslmode"],
        "sslrootcert": c["sslrootcert"],
        "connect_timeout": 2,
    }

    async def waits(password: str) -> bool:
        pool = swept_async_pool(kwargs={**info, "password": password}, min_size=0, max_size=1)
        await pool.open(wait=False)
        try:
            held = None
            with contextlib.suppress(PoolTimeout):
                held = await pool.getconn(timeout=3)
            with pytest.raises(PoolTimeout):
                await pool.getconn(timeout=0.3)
            if held is not None:
                await pool.putconn(held)
            return _only_waited(pool)
        finally:
            await pool.close()

    def verdict(password: str) -> bool:
        # In a thread of its own: an earlier test of the session (the
        # browser's) may leave an event loop running in this one.
        with ThreadPoolExecutor(1) as ex:
            return ex.submit(asyncio.run, waits(password)).result()

    assert verdict(c["password"]) is True  # busy: 429
    assert verdict("not-" + c["password"]) is False  # refused: why, in words


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
            run_ok(api, pid, "select 1")  # the one that comes back gets a pool
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


def test_true_is_not_a_number_of_the_sql_api(api: Api) -> None:
    """JSON true where a number goes is 422, not 1 ms or 1 row (pydantic's
    lax mode would take it as 1)."""
    pid = create_ok(api, plan_type="free")["id"]
    for field in ("timeout_ms", "max_rows"):
        err = error_of(run(api, pid, "select 1", **{field: True}), 422)
        assert field in err["message"] and "true or false" in err["message"], err
    project = create_ok(api, "rot")
    r = api.post(f"/v1/projects/{project['id']}/rotate-password", json={"overlap_s": True})
    assert r.status_code == 422, r.text
    # A text field says a string is expected, not a number (found by a
    # newcomer: "plan: ... a number is expected here").
    for field in ("name", "plan", "region", "residency", "subdomain"):
        body: dict[str, Any] = {"name": "t", "region": "us-east-1", field: True}
        err = error_of(api.post("/v1/projects", json=body), 422)
        said = err["message"]
        assert said.startswith(f"{field}: ") and "number" not in said, err
        assert "valid string" in said or "'eu', 'us' or 'apac'" in said, err


def test_max_rows_zero_gives_the_columns_and_the_same_command(api: Api) -> None:
    """As the schema says (its minimum was 1, found by a newcomer), and with
    the command as any other read's (it said `SELECT 1` here, `SELECT` else)."""
    pid = create_ok(api, plan_type="free")["id"]
    body = run(api, pid, "select 1 as a", max_rows=0).json()
    assert body["columns"][0]["name"] == "a" and body["rows"] == [], body
    assert body["truncated"] is True and body["command"] == "SELECT", body
    assert run(api, pid, "select 1 as a").json()["command"] == "SELECT"


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


def test_a_row_far_over_the_byte_cap_is_not_loaded(api: Api) -> None:
    """A value of tens of megabytes is not turned into Python and JSON only
    to be dropped: its row ends the answer, truncated; a write returning
    such rows still happens whole."""
    pid = create_ok(api, plan_type="free")["id"]  # 5 MB of rows
    body = run_ok(
        api,
        pid,
        "select g, case when g = 2 then repeat('x', 20000000) else 'small' end "
        "from generate_series(1, 3) g",
    )
    assert body["truncated"] is True
    assert body["rows"] == [[1, "small"]]
    body = run_ok(api, pid, "select decode(repeat('ab', 12000000), 'hex')")
    assert body["truncated"] is True and body["rows"] == []
    run_ok(api, pid, "create table big (x text)")
    body = run_ok(
        api,
        pid,
        "insert into big select repeat('y', 20000000) from generate_series(1, 2) returning x",
    )
    assert body["truncated"] is True and body["rows"] == []
    assert scalar(api, pid, "select sum(length(x)) from big") == 40000000
