"""The SQL API's errors and its auth path on the real fleet: SQLSTATEs, down
servers, deleted, foreign and paused projects, the auth cache and the
connection bound across many projects."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pgfleet.api.app import create_app
from pgfleet.auth import create_owner
from pgfleet.fleet.embedded import EmbeddedServer
from pgfleet.platform.core import Platform
from pgfleet.tenants.sql import gateway
from tests.helpers import (
    Api,
    FleetUnderTest,
    children_of,
    connect,
    create_ok,
    error_of,
    postmaster_pid,
    restart,
    run,
    run_ok,
    scalar,
    sql_error,
    until,
)


@contextmanager
def server_down(fleet: FleetUnderTest, region: str) -> Iterator[EmbeddedServer]:
    server = fleet.server(region)
    fleet.fleet.stop(server)
    try:
        assert not fleet.fleet.is_running(server)
        yield server
    finally:
        restart(fleet, server)


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
        # Once known unreachable, the next answers come at once, not after
        # another connect timeout.
        t0 = time.monotonic()
        for _ in range(3):
            assert error_of(run(api, pid, "select 1"), 503)["code"] == "region_unavailable"
        assert time.monotonic() - t0 < 2.0
    assert scalar(api, pid, "select 1") == 1


def test_a_server_that_just_went_down_is_said_at_once(api: Api, fleet: FleetUnderTest) -> None:
    """A new pool on a server a login reached a moment ago skips the knock;
    its first login, refused now, must still not wait out the pool's
    retries."""
    used = create_ok(api, "used", region="eu-central-1")["id"]
    fresh = create_ok(api, "fresh", region="eu-central-1")["id"]
    assert scalar(api, used, "select 1") == 1
    with server_down(fleet, "eu-central-1"):
        t0 = time.monotonic()
        err = error_of(run(api, fresh, "select 1"), 503)
        assert err["code"] == "region_unavailable", err
        assert time.monotonic() - t0 < 3.0
    assert scalar(api, fresh, "select 1") == 1


@contextmanager
def quick_logins(platform_factory: Any, owner: str) -> Iterator[tuple[Api, TestClient]]:
    """One API process whose logins time out after 1 s, and an owner's Api."""
    platform: Platform = platform_factory(api_workers=1, connect_timeout_s=1)
    _, token = create_owner(platform, owner)
    with TestClient(create_app(platform)) as client:
        yield Api(client, token), client


def test_a_frozen_server_is_503_not_refused_credentials(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    """A postmaster that accepts connections and serves none (SIGSTOP: the
    knock gets in, every login times out) is an unavailable region, not
    credentials the server refused (found by an attack: it answered 409).
    Both for a project's first statement (a connection of its own) and for
    one that comes back (its new pool's logins time out inside the pool)."""
    postmaster = postmaster_pid(fleet, "us-east-1")
    with quick_logins(platform_factory, "frozen") as (api, client):
        cold = create_ok(api, "cold", region="us-east-1")["id"]
        warm = create_ok(api, "warm", region="us-east-1")["id"]
        burst = create_ok(api, "burst", region="us-east-1")["id"]
        assert scalar(api, warm, "select 1") == 1  # the next one gets a pool
        os.kill(postmaster, signal.SIGSTOP)
        try:
            for pid in (warm, cold):
                t0 = time.monotonic()
                err = error_of(run(api, pid, "select 1"), 503)
                assert err["code"] == "region_unavailable", (pid == warm, err)
                assert time.monotonic() - t0 < 6.0
            # Four first statements at once (the first on a connection of its
            # own, the others waiting on a new pool): all 503, none 429.
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda _: run(api, burst, "select 1"), range(4)))
            assert [r.status_code for r in answers] == [503] * 4, [r.text for r in answers]
            pools = client.app.state.sql._pools  # type: ignore[attr-defined]
            assert len(pools) == 0  # the failed pool is not kept
        finally:
            os.kill(postmaster, signal.SIGCONT)
        for pid in (warm, cold, burst):
            assert until(lambda p=pid: run(api, p, "select 1").status_code == 200, 10)


@contextmanager
def wholly_frozen(postmaster: int) -> Iterator[None]:
    """The server and every backend of it stopped (SIGSTOP), as a paused
    host would leave them; going on again after."""
    frozen = [postmaster, *children_of(postmaster)]
    for p in frozen:
        os.kill(p, signal.SIGSTOP)
    try:
        yield
    finally:
        for p in frozen:
            os.kill(p, signal.SIGCONT)


def unavailable(api: Api, pid: str) -> tuple[dict[str, Any], float]:
    """A `select 1` that must be 503 region_unavailable: its error, and how
    long the call took."""
    t0 = time.monotonic()
    err = error_of(run(api, pid, "select 1", timeout_ms=500), 503)
    assert err["code"] == "region_unavailable", err
    return err, time.monotonic() - t0


def test_a_wholly_frozen_server_ends_the_call_with_503(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    """The server and every backend of it stopped (its host paused, say): a
    statement on a pooled session gets no answer, its cancel none, the end
    of its session none. The call still ends, with 503, soon after its
    timeout (found by an attack: it hung past 90 s)."""
    postmaster = postmaster_pid(fleet, "us-east-1")
    with quick_logins(platform_factory, "paused") as (api, _):
        pid = create_ok(api, "paused", region="us-east-1")["id"]
        for _ in range(2):  # the second leaves an idle pooled session
            assert scalar(api, pid, "select 1") == 1
        with wholly_frozen(postmaster):
            _, waited = unavailable(api, pid)
            # timeout_ms, the session's end a second later, the give-up 4 s
            # after: 5.5 s. Cancelling the task instead let psycopg send a
            # cancel of its own and wait for it: about 15.5 s.
            assert waited < 11, waited
        assert until(lambda: run(api, pid, "select 1").status_code == 200, 15)


@contextmanager
def slow_resets(monkeypatch: pytest.MonkeyPatch, seconds: float) -> Iterator[threading.Event]:
    """Every pooled session's reset (DISCARD ALL) starts `seconds` late: a
    test can act while one is on its way. The event is set as one begins."""
    began = threading.Event()
    real = gateway._reset

    async def late(conn: Any) -> None:
        began.set()
        await asyncio.sleep(seconds)
        await real(conn)

    monkeypatch.setattr(gateway, "_reset", late)
    yield began


def test_a_server_frozen_during_a_reset_is_503_not_a_busy_project(
    platform_factory: Any, fleet: FleetUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stopped while the pool resets the session a statement gave
    back (DISCARD ALL, after the answer went out): the next statement's wait
    for a connection meets only that reset, which gets no answer. That is an
    unavailable region, not a project with all its connections busy (it was
    429 when test_a_wholly_frozen_server_ends_the_call_with_503's freeze came
    before the reset's end, one CI run in five)."""
    postmaster = postmaster_pid(fleet, "us-east-1")
    with quick_logins(platform_factory, "resetting") as (api, _):
        pid = create_ok(api, "resetting", region="us-east-1")["id"]
        with slow_resets(monkeypatch, 0.3) as began:
            assert scalar(api, pid, "select 1") == 1  # the next one gets a pool
            assert scalar(api, pid, "select 1") == 1
            assert began.wait(5)
            with wholly_frozen(postmaster):  # before the reset is sent
                err, waited = unavailable(api, pid)
                assert "reset" in err["message"], err
                assert waited < 5, waited  # the wait for a connection: 1 s here
        assert until(lambda: run(api, pid, "select 1").status_code == 200, 15)


def test_a_busy_projects_wait_that_meets_resets_is_429(
    platform_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement that waited for a busy project's connection while they
    ran, and whose wait ended as they were being reset, met resets that
    began after it: the project is busy (429), its server is fine (found by
    a review: a first mend of the test above answered 503 here)."""
    platform: Platform = platform_factory(api_workers=1, tenant_pool_size=2, connect_timeout_s=1)
    _, token = create_owner(platform, "resets")
    with TestClient(create_app(platform)) as client:
        api = Api(client, token)
        pid = create_ok(api, "resets", plan_type="pro")["id"]
        with slow_resets(monkeypatch, 1.0), ThreadPoolExecutor(3) as ex:
            for _ in range(2):  # the second makes the pool the next ones wait on
                assert scalar(api, pid, "select 1") == 1
            time.sleep(1.5)  # its reset is over
            # Two run 0.3 s, their resets begin then and end 1 s later; the
            # third waits from the start, and its 1 s wait ends in between.
            calls = [ex.submit(run, api, pid, "select pg_sleep(0.3)") for _ in range(3)]
            codes = sorted(c.result().status_code for c in calls)
        assert codes == [200, 200, 429], codes
        assert until(lambda: run(api, pid, "select 1").status_code == 200, 5)


def test_a_reset_held_up_by_the_projects_own_lock_is_429_not_a_down_region(
    platform_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pooled session's reset drops its temporary tables, and one that
    inherits from a table waits while another session of the project holds
    a lock on that table: the server is fine and answers a login, so the
    next statement waiting for that connection is 429, not 503 (found by a
    review: the reset alone was taken for a frozen server)."""
    platform: Platform = platform_factory(api_workers=1, tenant_pool_size=1, connect_timeout_s=1)
    _, token = create_owner(platform, "locked")
    with TestClient(create_app(platform)) as client:
        api = Api(client, token)
        project = create_ok(api, "locked", plan_type="pro")
        pid = project["id"]
        with slow_resets(monkeypatch, 0.5) as began:
            run_ok(api, pid, "create table p (id int)")  # the next one gets a pool
            began.clear()
            run_ok(api, pid, "create temp table tc () inherits (p)")
            assert began.wait(5)
            with connect(project["connection"]) as own:
                own.execute("begin")
                own.execute("lock table p in access exclusive mode")  # before the reset
                err = error_of(run(api, pid, "select 1", timeout_ms=500), 429)
                assert err["code"] == "too_many_statements", err
                assert "reset" in err["message"] and "lock" in err["message"], err
                own.execute("rollback")
            assert until(lambda: run(api, pid, "select 1").status_code == 200, 5)


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


def test_only_a_project_that_comes_back_gets_a_pool(
    platform_factory: Any, fleet: FleetUnderTest
) -> None:
    """A statement logs in, runs and logs out, unless its project's previous
    one came within the last 2 x PGFLEET_TENANT_POOL_CAP (per process)
    others': then the project gets a pool, and its backend is reused."""
    platform: Platform = platform_factory(api_workers=1, tenant_pool_cap=2, tenant_pool_size=1)
    _, token = create_owner(platform, "back")
    with TestClient(create_app(platform)) as client:
        api = Api(client, token)
        pids = [create_ok(api, f"b{i}")["id"] for i in range(6)]
        users = [api.get(f"/v1/projects/{p}/connection").json()["user"] for p in pids]
        pools = client.app.state.sql._pools  # type: ignore[attr-defined]

        def pid_of(project: str) -> int:
            return int(scalar(api, project, "select pg_backend_pid()"))

        first = pid_of(pids[0])
        assert len(pools) == 0
        assert until(lambda: backends(fleet, users[:1]) == 0), "the backend was kept"
        # It came back at once: a pool, and the same backend from then on.
        second = pid_of(pids[0])
        assert second != first and len(pools) == 1
        assert pid_of(pids[0]) == second and backends(fleet, users[:1]) == 1
        # Round-robin over five projects, past the window of four: none comes
        # back in time, so none gets a pool and no backend is held for them.
        for _ in range(2):
            for p in pids[1:]:
                pid_of(p)
        assert len(pools) == 1
        assert until(lambda: backends(fleet, users[1:]) == 0)
        # The project with a pool keeps coming back while others pass...
        a = uuid.UUID(pids[0])
        for p in pids[1:5]:
            pid_of(p)
            pid_of(pids[0])
        assert pools.holds(a, "rw")
        # ...until two others come back and their pools push its pool out.
        for p in pids[1:3]:
            pid_of(p)
            pid_of(p)
        assert not pools.holds(a, "rw") and len(pools) == 2
        # Its next statement gets a pool again at once: it was among the
        # last few, though its pool was what it used.
        pid_of(pids[0])
        assert pools.holds(a, "rw")
        # Connections of their own count toward a project's most statements
        # at once, as a pool's do (tested with a slow one in
        # test_busy_project_is_429_not_a_down_region).


def backends(fleet: FleetUnderTest, users: list[str]) -> int:
    with fleet.admin_conn("us-east-1") as a:
        row = a.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = ANY(%s)", (users,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_password_changed_from_inside_is_said_not_called_an_outage(api: Api) -> None:
    """ALTER ROLE ... PASSWORD by the tenant: the SQL API's login is refused;
    that is 409 credentials_rejected with what to do, not a 503."""
    body = create_ok(api, region="eu-central-1")
    with connect(body["connection"]) as c:
        c.execute("ALTER ROLE CURRENT_USER PASSWORD 'chosen-inside'")
    err = error_of(run(api, body["id"], "select 1"), 409)
    assert err["code"] == "credentials_rejected", err
    assert "rotate-password" in err["message"] and "ALTER ROLE" in err["message"], err
    r = api.post(f"/v1/projects/{body['id']}/rotate-password", json={"role": "rw"})
    assert r.status_code == 200, r.text
    assert scalar(api, body["id"], "select 1") == 1
