"""Query insights for all traffic (issue 14, item 11): statements run from
psql or an app, not only through the SQL API, show in the project's stats,
sampled from its server's pg_stat_statements; a tenant sees only its own,
and no literal (a password, a secret value) is kept."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg import sql

from pgfleet.monitoring import insights
from pgfleet.monitoring.background import BackgroundLoop
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner
from tests.helpers import Api, connect, create_ok, get_ok, run_ok, until
from tests.test_cli import Cli

SECRET = "s3cr3t-lemon-4417"


def _statements(api: Api, pid: str) -> dict[str, Any]:
    out: dict[str, Any] = get_ok(api, f"/v1/projects/{pid}/stats")["server_statements"]
    return out


def test_statements_from_any_client_show_for_their_project_only(
    api: Api, platform: Platform
) -> None:
    a = create_ok(api, "from-psql", region="eu-central-1")
    b = create_ok(api, "neighbour", region="eu-central-1")
    assert _statements(api, a["id"])["statements"] == []
    with connect(a["connection"]) as conn:
        conn.execute("create table orders (id int primary key, note text)")
        run_ok(api, a["id"], "select count(*) from orders")  # the SQL API is a client too
        for i in range(5):
            conn.execute("insert into orders values (%s, %s)", (i, SECRET))
        for _ in range(3):
            conn.execute(f"select note from orders where note = '{SECRET}'").fetchall()  # noqa: S608
        # A person's password typed into an ALTER ROLE stays out (utility
        # statements are not tracked).
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(a["connection"]["user"]), sql.Literal(SECRET + "-pw")
            )
        )
    with connect(b["connection"]) as conn:
        conn.execute("select 'only b' as mine").fetchall()

    rounds = insights.sample(platform)
    eu = next(r for r in rounds if r["server"].startswith("eu-central-1"))
    assert eu["error"] is None and eu["statements"] >= 3, rounds

    got = _statements(api, a["id"])
    assert got["available"] and got["source"] == "pg_stat_statements", got
    texts = [s["query"] for s in got["statements"]]
    insert = next(s for s in got["statements"] if s["query"].startswith("insert into orders"))
    assert insert["calls"] == 5 and insert["rows"] == 5, insert
    select = next(s for s in got["statements"] if "from orders where note" in s["query"])
    assert select["calls"] == 3 and "$1" in select["query"], select
    assert select["mean_ms"] is not None and select["total_ms"] >= select["mean_ms"]
    assert any("count(*)" in t for t in texts), texts
    assert not any(SECRET in t for t in texts), texts  # literals are normalised away
    assert not any("only b" in t or "$1 as mine" in t for t in texts), texts
    assert not any(t.lower().startswith("alter role") for t in texts), texts
    # B sees its own and nothing of A's.
    b_texts = [s["query"] for s in _statements(api, b["id"])["statements"]]
    assert any("as mine" in t for t in b_texts) and not any("orders" in t for t in b_texts)
    # Nothing anywhere in the platform DB holds the secret.
    with platform.db.connection() as conn:
        row = conn.execute(
            "SELECT count(*) FROM statement_stats WHERE query LIKE %s", (f"%{SECRET}%",)
        ).fetchone()
    assert row == (0,)

    # A later round counts on; an unchanged statement is not rewritten.
    with connect(a["connection"] | {"password": SECRET + "-pw"}) as conn:
        conn.execute(f"select note from orders where note = '{SECRET}'").fetchall()  # noqa: S608
    again = insights.sample(platform)
    eu = next(r for r in again if r["server"].startswith("eu-central-1"))
    assert 1 <= eu["changed"] < eu["statements"], again
    select = next(
        s for s in _statements(api, a["id"])["statements"] if "from orders where note" in s["query"]
    )
    assert select["calls"] == 4


def test_the_health_loop_samples_and_regions_show_all_clients(
    api: Api, admin_api: Api, platform: Platform
) -> None:
    p = create_ok(api, "looped", region="us-west-1")
    with connect(p["connection"]) as conn:
        for _ in range(4):
            conn.execute("select 42").fetchall()
    loop = BackgroundLoop(platform).start()  # as an API process runs it
    try:

        def sampled() -> bool:
            found = _statements(api, p["id"])["statements"]
            return any(s["query"] == "select $1" and s["calls"] >= 4 for s in found)

        assert until(sampled, 20)
    finally:
        loop.stop()
    perf = get_ok(admin_api, "/v1/admin/stats/performance")
    assert perf["source"] == "sql_api"
    west = next(r for r in perf["server_statements"] if r["region"] == p["hosted_region"])
    assert west["source"] == "pg_stat_statements" and west["calls"] >= 4, perf
    rounds = {r["server"]: r for r in perf["sampling"]}
    assert rounds and all(r["error"] is None for r in rounds.values()), rounds
    # Due only after PGFLEET_INSIGHTS_INTERVAL_S: a second round right away skips.
    assert insights.sample(platform, due_only=True) == []


@pytest.mark.usefixtures("cli_env")
def test_the_cli_shows_both_sources(
    api: Api, api_url: str, owner: tuple[Owner, str], platform: Platform
) -> None:
    p = create_ok(api, "shown", region="eu-central-1")
    with connect(p["connection"]) as conn:
        conn.execute("create table kv (k int)")
        conn.execute("select k from kv where k > 10").fetchall()
    insights.sample(platform)
    cli = Cli(api_url, owner[1])
    shown = cli.ok("projects", "stats", "shown")  # by name
    lines = shown.splitlines()
    # Piped: each table as tab-separated lines under its header.
    assert lines[0] == "statement\tcalls\ttotal\tmean\trows\tcache hits", shown
    line = next(ln for ln in lines if "from kv" in ln)
    assert line.startswith("select k from kv where k > $1\t1\t"), line
    assert "route\tqueries\terrors\tavg ms\tp50 ms\tp95 ms\tp99 ms" in lines, shown
    data = cli.json("projects", "stats", p["id"])
    assert data["server_statements"]["statements"][0]["calls"] >= 1


def test_a_server_without_the_extension_says_so(api: Api, platform: Platform) -> None:
    p = create_ok(api, "bare", region="ap-southeast-1")
    server = next(s for s in platform.servers.all() if s.name == p["server"])
    with platform.servers.admin_connection(server) as conn:
        conn.execute("DROP EXTENSION pg_stat_statements")
    try:
        (done,) = [r for r in insights.sample(platform) if r["server"] == p["server"]]
        assert "pg_stat_statements is not loaded" in done["error"], done
        got = _statements(api, p["id"])
        assert not got["available"] and "not loaded" in got["note"], got
    finally:
        with platform.servers.admin_connection(server) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements SCHEMA public")


def test_a_planted_function_in_the_tenant_database_is_never_called(
    api: Api, platform: Platform
) -> None:
    """Sampling reads the admin database only; a tenant's look-alike objects
    in its own database are not reached."""
    p = create_ok(api, "trojan", region="eu-central-1")
    with connect(p["connection"]) as conn:
        conn.execute("create table called (at timestamptz default now())")
        conn.execute(
            "create function public.pg_stat_statements(boolean) returns setof record "
            "language sql as 'insert into called default values returning null::record'"
        )
        conn.execute(
            "create view public.pg_database as select * from pg_catalog.pg_database "
            "where (select count(*) from called) >= 0"
        )
        conn.execute("select 1").fetchall()
    insights.sample(platform)
    with connect(p["connection"]) as conn:
        assert conn.execute("select count(*) from called").fetchone() == (0,)
    assert any(s["query"] == "select $1" for s in _statements(api, p["id"])["statements"])


def test_a_server_that_tracks_utility_statements_is_not_sampled(
    api: Api, platform: Platform
) -> None:
    """As an external server might be configured: its utility statements keep
    their literals, so nothing of it is copied out."""
    p = create_ok(api, "utility", region="us-east-1")
    server = next(s for s in platform.servers.all() if s.name == p["server"])

    def track_utility(value: str) -> None:
        with platform.servers.admin_connection(server) as conn:
            conn.execute(f"ALTER SYSTEM SET pg_stat_statements.track_utility = {value}")
            conn.execute("SELECT pg_reload_conf()")

    track_utility("on")
    try:
        with connect(p["connection"]) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(p["connection"]["user"]), sql.Literal(SECRET)
                )
            )
        (done,) = [r for r in insights.sample(platform) if r["server"] == p["server"]]
        assert "track_utility is on" in done["error"], done
        assert not _statements(api, p["id"])["available"]
        with platform.db.connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM statement_stats WHERE query LIKE %s", (f"%{SECRET}%",)
            ).fetchone()
        assert row == (0,)
    finally:
        track_utility("off")


def test_another_tenants_flood_does_not_wipe_a_projects_figures(
    api: Api, platform: Platform
) -> None:
    """The server's capacity is shared (10,000 statements): a tenant sending
    thousands of distinct statements evicts others' entries there. The
    platform keeps what it last saw of them, marked gone, and keeps the
    flooder to its own bounded share."""
    bob = create_ok(api, "bob", region="eu-central-1")
    alice = create_ok(api, "alice", region="eu-central-1")
    with connect(bob["connection"]) as conn:
        conn.execute("create table orders (id int, total int)")
        for _ in range(3):
            conn.execute("select sum(total) from orders where id > 0").fetchall()
    insights.sample(platform)
    server = next(s for s in platform.servers.all() if s.name == bob["server"])
    with platform.servers.admin_connection(server) as conn:  # the flood's effect, at once
        conn.execute("SELECT public.pg_stat_statements_reset()")
    with connect(alice["connection"]) as conn:
        cols = ", ".join(f"c{i} int" for i in range(40))
        conn.execute(f"create table wide ({cols})")
        for i in range(40):
            for j in range(i + 1, 40):
                conn.execute(f"select c{i}, c{j} from wide").fetchall()  # noqa: S608
    insights.sample(platform)
    kept = _statements(api, bob["id"])["statements"]
    mine = next(s for s in kept if "sum(total)" in s["query"])
    assert mine["calls"] == 3 and mine["gone_at"] is not None, kept
    with platform.db.connection() as conn:
        n = conn.execute(
            "SELECT count(*) FROM statement_stats WHERE tenant_id = %s", (alice["id"],)
        ).fetchone()
    assert n is not None and n[0] == insights.MAX_PER_PROJECT
    # Back on the server, it is live again.
    with connect(bob["connection"]) as conn:
        conn.execute("select sum(total) from orders where id > 0").fetchall()
    insights.sample(platform)
    mine = next(s for s in _statements(api, bob["id"])["statements"] if "sum(total)" in s["query"])
    assert mine["calls"] == 1 and mine["gone_at"] is None


def test_texts_too_large_to_read_cost_only_the_new_statements(
    api: Api, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tenant can make the server's statement texts huge, and reading them
    slow; counters are read without texts, so known statements keep being
    counted and only new ones wait."""
    p = create_ok(api, "texts", region="us-east-1")
    with connect(p["connection"]) as conn:
        conn.execute("select 1 + 1").fetchall()
    insights.sample(platform)
    slow = (
        "SELECT NULL FROM pg_catalog.pg_sleep(30) "
        "WHERE %s::int > 0 AND %s::bigint[] IS NOT NULL AND %s::text[] IS NOT NULL"
    )
    monkeypatch.setattr(insights, "_TEXTS", slow)
    monkeypatch.setattr(insights, "READ_TIMEOUT_S", 1)
    with connect(p["connection"]) as conn:
        conn.execute("select 1 + 1").fetchall()
        conn.execute("select 'new' || 'one'").fetchall()
    (done,) = [r for r in insights.sample(platform) if r["server"] == p["server"]]
    assert "could not be read within 1 s" in done["error"], done
    got = _statements(api, p["id"])["statements"]
    assert next(s for s in got if s["query"] == "select $1 + $2")["calls"] == 2
    assert not any("||" in s["query"] for s in got)
