"""The routers (PgBouncer per region and pooling mode), with real clients:
what a user connects to, what it refuses, and what the operations engine
asks of it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgfleet.fleet.binaries import find_binaries
from pgfleet.fleet.router import ROUTER_ADMIN, Routers
from pgfleet.platform.core import Platform
from pgfleet.tenants import routing
from pgfleet.tenants.naming import tenant_db_name
from tests.helpers import ROUTER_NO_ENTRY, Api, FleetUnderTest, create_ok, error_of, run_psql


def files_only_routers(root: Path) -> Routers:
    """Routers with no process: their files under `root`, nothing else."""
    return Routers(
        root,
        [],
        host="127.0.0.1",
        ca_file=root / "ca.pem",
        admin_password_file=root / "router.password",
        owner=None,
        run=None,
    )


def conn_of(api: Api, pid: str, **params: Any) -> dict[str, Any]:
    r = api.get(f"/v1/projects/{pid}/connection", params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def connect(c: dict[str, Any], **over: Any) -> psycopg.Connection[Any]:
    kw = {
        "host": c["host"],
        "port": c["port"],
        "dbname": c["database"],
        "user": c["user"],
        "password": c["password"],
        "sslmode": c["sslmode"],
        "sslrootcert": c["sslrootcert"],
        "connect_timeout": 5,
        "autocommit": True,
        **over,
    }
    return psycopg.connect(**kw)


def server_port(fleet: FleetUnderTest, region: str) -> int:
    return fleet.server(region).port


def backends(fleet: FleetUnderTest, region: str, database: str) -> int:
    with fleet.admin_conn(region) as c:
        row = c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_the_connection_string_names_the_router_and_lands_on_the_project_server(
    api: Api, fleet: FleetUnderTest
) -> None:
    p = create_ok(api, "routed", region="eu-central-1")
    c = conn_of(api, p["id"])
    routers = fleet.fleet.routers
    spec = next(s for s in routers.specs if s.region == "eu-central-1" and s.pool_mode == "session")
    assert (c["host"], c["port"], c["pooling"], c["direct"]) == (
        "127.0.0.1",
        spec.port,
        "session",
        False,
    )
    assert c["router_region"] == "eu-central-1" and c["sslmode"] == "verify-full"
    assert f":{spec.port}/" in c["uri"]
    # What psql does with the URI: through the router onto the eu server.
    with psycopg.connect(c["uri"], connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT current_database(), current_user, current_setting('port')::int"
        ).fetchone()
    assert row == (c["database"], c["user"], server_port(fleet, "eu-central-1"))
    # Behind the router, the server sees a TLS session from the router's
    # address (verify-full against the fleet CA, in the router's ini).
    with connect(c) as conn:
        row = conn.execute(
            "SELECT ssl, host(inet_client_addr()) FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
    assert row == (True, "127.0.0.1")
    # The direct string, labelled, names the server itself.
    d = conn_of(api, p["id"], direct="true")
    assert (d["port"], d["direct"], d["pooling"]) == (
        server_port(fleet, "eu-central-1"),
        True,
        None,
    )
    assert "pg_dump" in d["note"]
    # The create's own answer hands out the router too.
    assert p["connection"]["port"] == spec.port


def test_transaction_pooling_port_and_its_note(api: Api, fleet: FleetUnderTest) -> None:
    p = create_ok(api, "tx", region="us-east-1")
    c = conn_of(api, p["id"], pooling="transaction")
    spec = next(
        s
        for s in fleet.fleet.routers.specs
        if s.region == "us-east-1" and s.pool_mode == "transaction"
    )
    assert (c["port"], c["pooling"]) == (spec.port, "transaction")
    assert "transaction" in c["note"] and "SET" in c["note"]
    with connect(c) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 10)")
        with conn.transaction():
            assert conn.execute("SELECT sum(x) FROM t").fetchone() == (55,)
    res = run_psql(c["uri"], "SELECT count(*) FROM t")  # psql, through the same port
    assert (res.returncode, res.stdout.strip()) == (0, "10"), res.stderr
    ro = conn_of(api, p["id"], pooling="transaction", mode="ro")
    with connect(ro) as conn, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        conn.execute("INSERT INTO t VALUES (1)")
    # Drivers are told to prepare nothing in this mode, and many clients
    # that do so share three backends without an error.
    assert "prepare_threshold=None" in c["note"]
    errors: list[BaseException] = []

    def unprepared(k: int) -> None:
        try:
            with connect(c, prepare_threshold=None) as conn:
                for i in range(30):
                    row = conn.execute("SELECT %s::int + count(*) FROM t", (i,)).fetchone()
                    assert row == (i + 10,)
                    row = conn.execute("SELECT %s::int * 2, pg_sleep(0.002)", (k,)).fetchone()
                    assert row is not None and row[0] == 2 * k
        except BaseException as e:  # reported below
            errors.append(e)

    workers = [threading.Thread(target=unprepared, args=(k,)) for k in range(6)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []
    # The router keeps no client's prepared statements (PgBouncer 1.24 would
    # keep every one, with no bound per client: a tenant could fill the
    # router's memory).
    config = {r["key"]: r["value"] for r in fleet.fleet.routers.command(spec, "SHOW CONFIG")}
    assert config["max_prepared_statements"] == "0"
    with connect(c) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row == (True,)  # TLS to the server in transaction pooling too


def test_another_region_router_forwards_and_says_so(api: Api, fleet: FleetUnderTest) -> None:
    p = create_ok(api, "far", region="ap-southeast-1")
    c = conn_of(api, p["id"], via="us-east-1")
    assert c["router_region"] == "us-east-1" and "ap-southeast-1" in c["note"]
    with connect(c) as conn:
        assert conn.execute("SELECT current_setting('port')::int").fetchone() == (
            server_port(fleet, "ap-southeast-1"),
        )
    err = error_of(api.get(f"/v1/projects/{p['id']}/connection", params={"via": "eu-west-1"}), 422)
    assert "eu-west-1 has no router" in err["message"]
    err = error_of(api.get(f"/v1/projects/{p['id']}/connection", params={"pooling": "bogus"}), 422)


def test_the_router_refuses_plaintext_other_projects_and_its_console(
    api: Api, fleet: FleetUnderTest
) -> None:
    a = conn_of(api, create_ok(api, "a")["id"])
    b = conn_of(api, create_ok(api, "b")["id"])
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        connect(a, sslmode="disable")
    # A's credentials, B's database: the router's HBA admits only B's own
    # roles to it, so it refuses before any password, and never holds one
    # of B's client slots (B's plan admits 100): a tenant cannot fill them.
    for _ in range(120):
        with pytest.raises(psycopg.OperationalError, match=ROUTER_NO_ENTRY):
            connect(a, dbname=b["database"])
    with connect(b) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (b["user"],)
    # B's user with A's password: not admitted to A's database at all, and
    # on B's own the password fails. A superuser's name: unknown to the router.
    with pytest.raises(psycopg.OperationalError, match=ROUTER_NO_ENTRY):
        connect(a, user=b["user"])
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        connect(a, user=b["user"], dbname=b["database"])
    with pytest.raises(psycopg.OperationalError):
        connect(a, user="pgfleet_admin")
    # The admin console: not for tenants, not even with a valid password.
    with pytest.raises(psycopg.OperationalError, match=r"not allowed|failed"):
        connect(a, dbname="pgbouncer")
    with pytest.raises(psycopg.OperationalError, match="login rejected"):
        connect(a, dbname="pgbouncer", user=ROUTER_ADMIN)
    # Nor for anyone over TCP, with the admin's own password: only through
    # the router's Unix socket, in its 0700 directory.
    routers = fleet.fleet.routers
    spec = routers.spec(a["router_region"], "session")
    admin = {"dbname": "pgbouncer", "user": ROUTER_ADMIN, "password": routers.admin_password()}
    with pytest.raises(psycopg.OperationalError, match="login rejected"):
        connect({**a, **admin, "database": "pgbouncer"})
    assert routers.paths.dir(spec).stat().st_mode & 0o777 == 0o700
    with psycopg.connect(
        host=str(routers.paths.dir(spec)),
        port=spec.port,
        sslmode="disable",
        autocommit=True,
        prepare_threshold=None,
        **admin,
    ) as conn:
        assert conn.execute("SHOW VERSION").fetchone() is not None
    with pytest.raises(psycopg.OperationalError, match="login rejected"):
        psycopg.connect(
            host=str(routers.paths.dir(spec)),
            port=spec.port,
            sslmode="disable",
            dbname=a["database"],
            user=a["user"],
            password=a["password"],
        )
    # The files pgfleet writes: the auth file holds verifiers only, 0600.
    paths = fleet.fleet.routers.paths
    assert paths.auth.stat().st_mode & 0o777 == 0o600
    text = paths.auth.read_text()
    assert a["password"] not in text and a["user"] in text and "SCRAM-SHA-256$" in text
    assert paths.root.stat().st_mode & 0o777 == 0o700


def test_rotation_and_pause_take_effect_through_the_router(api: Api, fleet: FleetUnderTest) -> None:
    p = create_ok(api, "rot")
    old = conn_of(api, p["id"])
    held = connect(old)
    held.execute("SELECT 1")
    # A transaction-pooling client holds no backend between transactions:
    # the router itself must end it.
    tx_held = connect(conn_of(api, p["id"], pooling="transaction"))
    tx_held.execute("SELECT 1")
    # Nor does a session client that has not run a query yet.
    quiet = connect(old)
    # The read-only role's clients, in both routers, keep their password.
    ro_kept = [
        connect(conn_of(api, p["id"], mode="ro", pooling=m)) for m in ("session", "transaction")
    ]
    for x in ro_kept:
        x.execute("SELECT 1")
    r = api.post(
        f"/v1/projects/{p['id']}/rotate-password", params={"wait": "true"}, json={"role": "rw"}
    )
    assert r.status_code == 200, r.text
    new = conn_of(api, p["id"])
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        connect(old)
    t0 = time.perf_counter()
    for ended in (held, tx_held, quiet):
        with pytest.raises(psycopg.OperationalError):
            ended.execute("SELECT 1")  # ended by the rotation
        ended.close()
    assert time.perf_counter() - t0 < 5  # at once, not after a wait in the router
    for x in ro_kept:  # only the rotated role's clients ended (KILL_CLIENT)
        assert x.execute("SELECT current_user").fetchone() is not None
        x.close()
    with connect(new) as conn:
        conn.execute("SELECT 1")
    open_conn = connect(new)
    r = api.post(f"/v1/projects/{p['id']}/pause", params={"wait": "true"})
    assert r.status_code == 200, r.text
    with pytest.raises(psycopg.OperationalError):
        open_conn.execute("SELECT 1")  # ended by the pause
    open_conn.close()
    with pytest.raises(psycopg.OperationalError):
        connect(new)
    r = api.post(f"/v1/projects/{p['id']}/resume", params={"wait": "true"})
    assert r.status_code == 200, r.text
    with connect(new) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def pgbench(fleet: FleetUnderTest, c: dict[str, Any], *args: str, timeout: float = 120) -> str:
    bins = find_binaries()
    env = {
        "PGPASSWORD": c["password"],
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": c["sslrootcert"],
        "PATH": "/usr/bin:/bin",
    }
    res = subprocess.run(
        [
            bins.path("pgbench"),
            "-h",
            c["host"],
            "-p",
            str(c["port"]),
            "-U",
            c["user"],
            *args,
            c["database"],
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


def failed_transactions(out: str) -> int:
    m = re.search(r"number of failed transactions: (\d+)", out)
    return int(m.group(1)) if m else 0


@pytest.mark.parametrize("pooling", ["session", "transaction"])
def test_pgbench_through_the_router(api: Api, fleet: FleetUnderTest, pooling: str) -> None:
    p = create_ok(api, f"bench-{pooling}")
    c = conn_of(api, p["id"], pooling=pooling)
    pgbench(fleet, conn_of(api, p["id"], direct="true"), "-i", "-q", "-s", "1")
    out = pgbench(fleet, c, "-c", "8", "-j", "2", "-t", "50", "-n")
    assert "number of transactions actually processed: 400/400" in out, out
    assert failed_transactions(out) == 0
    # Eight clients, a free plan's pool: the server never saw eight backends
    # of this project from this router (sv_* of its pools stay within it).
    rows = fleet.fleet.routers.command(
        fleet.fleet.routers.spec("us-east-1", pooling),
        "SHOW DATABASES",
    )
    mine = next(r for r in rows if r["name"] == c["database"])
    assert mine["pool_size"] == 3 and mine["max_connections"] == 3


def test_many_clients_share_a_bounded_pool(api: Api, fleet: FleetUnderTest) -> None:
    p = create_ok(api, "crowd")
    c = conn_of(api, p["id"], pooling="transaction")
    conns = [connect(c) for _ in range(40)]
    try:
        peak = 0
        barrier = threading.Barrier(len(conns))

        def work(conn: psycopg.Connection[Any]) -> None:
            barrier.wait()
            conn.execute("SELECT pg_sleep(0.05)")

        threads = [threading.Thread(target=work, args=(x,)) for x in conns]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            peak = max(peak, backends(fleet, "us-east-1", c["database"]))
            time.sleep(0.01)
        for t in threads:
            t.join()
        assert 1 <= peak <= 3, peak
    finally:
        for x in conns:
            x.close()


def test_a_router_admits_the_plans_clients_and_refuses_the_next(
    api: Api, fleet: FleetUnderTest
) -> None:
    """Each router accepts the plan's `router_clients` for one project;
    the next login is refused at once, saying why, while other projects
    through the same router are not affected."""
    plans = api.get("/v1/plans").json()["plans"]
    limit = next(x for x in plans if x["id"] == "free")["router_clients"]
    assert limit >= next(x for x in plans if x["id"] == "free")["router_pool_size"]
    c = conn_of(api, create_ok(api, "capped")["id"], pooling="transaction")
    other = conn_of(api, create_ok(api, "beside")["id"], pooling="transaction")
    conns: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(limit):
            conns.append(connect(c))
        with pytest.raises(psycopg.OperationalError, match="max_db_client_connections"):
            connect(c)
        with connect(other) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # The session router counts its own clients.
        session = fleet.fleet.routers.spec(c["router_region"], "session")
        with connect({**c, "port": session.port}) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        conns.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the router notices the close on its next loop
            try:
                with connect(c) as conn:
                    assert conn.execute("SELECT 1").fetchone() == (1,)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        for x in conns:
            x.close()


def test_reload_under_load_loses_nothing(api: Api, fleet: FleetUnderTest) -> None:
    """pgbench on project A keeps running, without an error, while projects
    B..K are created and deleted (each a router reload)."""
    a = create_ok(api, "steady")
    pgbench(fleet, conn_of(api, a["id"], direct="true"), "-i", "-q", "-s", "1")
    results: dict[str, str] = {}

    def run(pooling: str) -> None:
        results[pooling] = pgbench(
            fleet, conn_of(api, a["id"], pooling=pooling), "-c", "4", "-T", "6", "-n"
        )

    threads = [threading.Thread(target=run, args=(m,)) for m in ("session", "transaction")]
    for t in threads:
        t.start()
    made = [create_ok(api, f"churn-{i}")["id"] for i in range(10)]
    for pid in made:
        assert api.delete(f"/v1/projects/{pid}", params={"wait": "true"}).status_code == 200
    for t in threads:
        t.join()
    for out in results.values():
        assert failed_transactions(out) == 0, out
        assert re.search(r"processed: \d+$", out, re.M), out
    assert len(results) == 2


def test_hold_and_release_a_database(api: Api, fleet: FleetUnderTest, platform: Platform) -> None:
    """The engine's hold: clients' queries wait in the router, then run; a
    pgbench run across a 500 ms hold has no error and shows it as latency."""
    p = create_ok(api, "held")
    c = conn_of(api, p["id"], pooling="transaction")
    pgbench(fleet, conn_of(api, p["id"], direct="true"), "-i", "-q", "-s", "1")
    out: list[str] = []
    t = threading.Thread(
        target=lambda: out.append(pgbench(fleet, c, "-c", "4", "-T", "3", "-n", "-r", "-S"))
    )
    waiting = connect(c)
    waiting.execute("SELECT 1")
    t.start()
    time.sleep(1.0)
    held = routing.hold(platform, uuid.UUID(p["id"]))
    assert any(n.endswith("transaction") for n in held.held), held.held
    answered: list[float] = []
    asked = time.perf_counter()
    q = threading.Thread(
        target=lambda: (waiting.execute("SELECT 1"), answered.append(time.perf_counter()))
    )
    q.start()
    time.sleep(0.5)
    assert not answered, "a query ran while its database was held"
    released = time.perf_counter()
    assert held.release() == []
    q.join(5)
    t.join()
    waiting.close()
    assert failed_transactions(out[0]) == 0, out[0]
    # It waited for the hold, and ran within milliseconds of the release.
    assert answered and answered[0] - asked >= 0.45
    assert answered[0] - released < 0.2, answered[0] - released


def test_a_killed_router_degrades_its_region_until_up_restarts_it(
    api: Api, client: Any, fleet: FleetUnderTest
) -> None:
    p = create_ok(api, "survivor", region="eu-central-1")
    c = conn_of(api, p["id"])
    routers = fleet.fleet.routers
    spec = routers.spec("eu-central-1", "session")
    pid = routers.state(spec).pid
    assert pid is not None
    conn = connect(c)
    os.kill(pid, signal.SIGKILL)
    try:
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        health = client.get("/health").json()
        assert health["status"] == "degraded"
        eu = health["regions"]["eu-central-1"]
        assert eu["status"] == "degraded"
        assert any(r["name"] == spec.name and not r["ok"] for r in eu["routers"])
        assert any("router eu-central-1-session is not running" in r for r in health["reasons"])
        assert health["regions"]["us-east-1"]["status"] == "ok"
    finally:
        fleet.fleet.up()  # what `pgfleet up` runs: starts what is not running
    assert routers.state(spec).running
    # It came back with the table it had: the client reconnects.
    with connect(c) as again:
        assert again.execute("SELECT current_database()").fetchone() == (c["database"],)
    assert client.get("/health").json()["regions"]["eu-central-1"]["status"] == "ok"


def test_sync_repairs_a_router_that_lost_its_table(
    api: Api, fleet: FleetUnderTest, platform: Platform
) -> None:
    """A router whose loaded databases differ from the platform DB (here: its
    files emptied behind pgfleet's back and reloaded) is reloaded by the
    periodic sync."""
    p = create_ok(api, "drift")
    routers = fleet.fleet.routers
    spec = routers.spec("us-east-1", "session")
    db = conn_of(api, p["id"])["database"]
    # The kept admin session runs the same command again and again (psycopg
    # must not switch it to prepared statements, which the console refuses).
    for _ in range(8):
        assert db in routers.databases(spec)
    routers.write([], [])
    routers.reload(spec)
    assert db not in routers.databases(spec)
    done = routing.sync(platform)
    assert spec.name in done.reloaded
    assert db in routers.databases(spec)
    with connect(conn_of(api, p["id"])) as conn:
        conn.execute("SELECT 1")


def test_the_servers_socket_admits_project_roles_into_their_own_database_only(
    api: Api, fleet: FleetUnderTest
) -> None:
    """The SQL gateway's way to the servers: a Unix socket in a 0700
    directory, with pg_hba's `local samerole` (the admin only into
    `postgres`, by peer)."""
    a = conn_of(api, create_ok(api, "sock-a")["id"], direct="true")
    b = conn_of(api, create_ok(api, "sock-b")["id"], direct="true")
    srv = fleet.server("us-east-1")
    sock = fleet.fleet.socket_dir(srv.name)
    assert sock.stat().st_mode & 0o777 == 0o700
    local = {"host": str(sock), "port": srv.port, "sslmode": "disable", "sslrootcert": None}
    with connect({**a, **local}) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (a["database"],)
    with pytest.raises(psycopg.OperationalError, match=r"pg_hba\.conf"):
        connect({**a, **local, "database": b["database"]})
    # The admin: never into a project's database; into `postgres` only as
    # the servers' own OS user (peer: pgBackRest's way in), which the suite
    # is not when it runs as root.
    admin = {
        "host": str(sock),
        "port": srv.port,
        "user": "pgfleet_admin",
        "password": fleet.fleet.admin_password(srv.name),
        "connect_timeout": 5,
    }
    with pytest.raises(psycopg.OperationalError, match=r"pg_hba\.conf"):
        psycopg.connect(**admin, dbname=a["database"])
    if os.geteuid() == 0:
        with pytest.raises(psycopg.OperationalError, match="Peer authentication failed"):
            psycopg.connect(**admin, dbname="postgres")


def test_a_tenant_planting_a_monstrous_verifier_locks_out_nobody(
    api: Api, fleet: FleetUnderTest, platform: Platform
) -> None:
    """PostgreSQL stores any well-formed SCRAM verifier a role sets for
    itself, even one with a 2 kB salt, which PgBouncer cannot read (it stops
    reading its auth file there, everyone after and the admin with it)."""
    evil = conn_of(api, create_ok(api, "aaa-evil")["id"], direct="true")
    victim = conn_of(api, create_ok(api, "zzz-victim")["id"])
    salt = "QUFB" * 600  # valid base64, 2,400 characters
    key = "A" * 43 + "="
    with connect(evil) as conn:
        conn.execute(
            psycopg.sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                psycopg.sql.Identifier(evil["user"]),
                psycopg.sql.Literal(f"SCRAM-SHA-256$4096:{salt}${key}:{key}"),
            )
        )
    done = routing.sync(platform)
    assert not done.unreachable, done
    assert evil["user"] not in fleet.fleet.routers.paths.auth.read_text()
    with connect(victim) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    for spec in fleet.fleet.routers.specs:
        fleet.fleet.routers.command(spec, "SHOW VERSION")


def test_a_create_reads_only_new_verifiers_and_the_sync_reads_them_all(
    api: Api, platform: Platform
) -> None:
    """A route step reads from the servers only the verifiers the auth file
    lacks (and a rotation's), not every project's; the periodic sync reads
    them all, so a password changed behind pgfleet's back reaches the
    routers within one sync."""
    p = create_ok(api, "own-password")
    c = conn_of(api, p["id"])
    routers = platform.routers
    assert routers is not None
    before = routers.current_logins()[c["user"]]
    chosen = "chosen-by-the-tenant-" + uuid.uuid4().hex
    with connect(conn_of(api, p["id"], direct="true")) as direct:
        direct.execute(f"ALTER ROLE current_user PASSWORD '{chosen}'")
    create_ok(api, "bystander")  # its route step kept p's verifier as it was
    assert routers.current_logins()[c["user"]] == before
    routing.sync(platform)
    assert routers.current_logins()[c["user"]] != before
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        connect(c)
    with connect(c, password=chosen) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (c["user"],)


def test_the_auth_file_reads_back_what_was_written() -> None:
    from pgfleet.fleet.router import Login, _unquote_pair, render_auth

    keys = "a" * 43 + "=:" + "b" * 43 + "="
    verifier = "SCRAM-SHA-256$16:c2FsdHNhbHRzYWx0c2FsdA==$" + keys
    text = render_auth([Login("tenant_x_rw", verifier), Login('we"ird', verifier)])
    pairs = [_unquote_pair(line) for line in text.splitlines()]
    assert pairs == [("tenant_x_rw", verifier), ('we"ird', verifier)]
    assert _unquote_pair('"alone"') is None and _unquote_pair("") is None


def test_edits_in_place_make_the_files_a_whole_rewrite_would(tmp_path: Any) -> None:
    """A publish for a few projects edits their lines in place (Routers.edit);
    the result must be byte for byte what writing every line would give, or
    the periodic sync would see a difference and reload every router."""
    import random

    from pgfleet.fleet.router import Login, Route

    def make() -> Routers:
        return files_only_routers(tmp_path)

    def verifier(i: int) -> str:
        salt = f"{i:016d}".encode().hex()[:22] + "=="
        return f"SCRAM-SHA-256${i + 1}:{salt}$" + "a" * 43 + "=:" + "b" * 43 + "="

    rng = random.Random(7)
    routes: dict[str, Route] = {}
    logins: dict[str, str] = {}
    routers = make()
    routers.write([], [])
    for step in range(300):
        db = f"tenant_{rng.randrange(40):032x}"
        roles = [db + "_rw", db + "_ro"]
        if rng.random() < 0.3:  # deleted or paused: no route, no logins
            routes.pop(db, None)
            for r in roles:
                logins.pop(r, None)
            change_r: dict[str, Route | None] = {db: None}
            change_l: dict[str, str | None] = dict.fromkeys(roles)
        else:
            route = Route(
                db, "127.0.0.1", 5432 + rng.randrange(3), 3, rng.choice([100, 500]), tuple(roles)
            )
            routes[db] = route
            change_r, change_l = {db: route}, {}
            for r in roles:
                v = verifier(step) if rng.random() < 0.9 else "not a verifier"
                change_l[r] = v
                if v.startswith("SCRAM"):
                    logins[r] = v
                else:
                    logins.pop(r, None)  # left out, as a whole write leaves it out
        assert routers.edit(change_r, change_l) is not None
    paths = routers.paths
    before = (paths.routes.read_text(), paths.auth.read_text(), paths.hba.read_text())
    whole = make()
    changed = whole.write(list(routes.values()), [Login(u, v) for u, v in logins.items()])
    assert not changed
    assert (paths.routes.read_text(), paths.auth.read_text(), paths.hba.read_text()) == before
    assert len(before[0].splitlines()) == len(routes) + 2
    # The HBA admits each routed database's own roles, and nobody else.
    rules = [x.split() for x in before[2].splitlines() if x.startswith("hostssl")]
    assert sorted(r[1] for r in rules) == sorted(routes)
    assert all(r[2] == f"{r[1]}_rw,{r[1]}_ro" and r[3:] == ["all", "scram-sha-256"] for r in rules)
    # Files from elsewhere (an older pgfleet's, none) are written whole instead.
    routers.paths.routes.write_text("[databases]\n")
    assert routers.edit({}, {}) is None


def test_in_place_edits_leave_the_sync_nothing_to_repair(
    api: Api, fleet: FleetUnderTest, platform: Platform
) -> None:
    """Every operation's route step edits only its project's lines: after
    creates, a pause, a rotation and a delete, the files are exactly what
    the periodic sync would write, and every router has every project."""
    made = [create_ok(api, f"edited-{i}") for i in range(3)]
    r = api.post(f"/v1/projects/{made[0]['id']}/pause", params={"wait": "true"})
    assert r.status_code == 200, r.text
    r = api.post(
        f"/v1/projects/{made[1]['id']}/rotate-password",
        params={"wait": "true"},
        json={"role": "ro"},
    )
    assert r.status_code == 200, r.text
    r = api.delete(f"/v1/projects/{made[2]['id']}", params={"wait": "true"})
    assert r.status_code in (200, 202), r.text
    routers = platform.routers
    assert routers is not None
    text = routers.paths.routes.read_text()
    assert tenant_db_name(made[1]["id"]) + " = " in text
    for gone in (made[0], made[2]):
        assert tenant_db_name(gone["id"]) not in text
    assert routing.drift(platform) == {}
    assert routing.publish(platform, repair=True).changed is False
    with connect(conn_of(api, made[1]["id"], mode="ro")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_publishes_waiting_in_two_processes_share_one_and_each_returns_routed(
    api: Api, platform: Platform
) -> None:
    """Route steps waiting for the lock in two API processes (two Platforms
    here) are done by one publish: whoever gets the lock first takes all of
    them; the others find theirs done. Each project is in every router when
    its publish returns, and nothing is left asked for."""
    from pgfleet.tenants.naming import login_role_names

    made = [create_ok(api, f"shared-{i}") for i in range(6)]
    ids = [uuid.UUID(m["id"]) for m in made]
    other = Platform(platform.settings, platform.conninfo)  # a second process
    routers = platform.routers
    assert routers is not None
    try:
        # Out of the files again, as if their route steps had not run yet.
        dbs = [tenant_db_name(t) for t in ids]
        routers.edit(dict.fromkeys(dbs), {r: None for db in dbs for r in login_role_names(db)})
        results: dict[int, tuple[bool, bool]] = {}

        def one(i: int) -> None:
            out = routing.publish((platform, other)[i % 2], projects=[ids[i]])
            routed = all(dbs[i] in routers.databases(spec) for spec in routers.specs)
            results[i] = (out.shared, routed)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        with routers.exclusive():  # held until all six have asked
            for t in threads:
                t.start()
            deadline = time.monotonic() + 10
            while len(routing._Requests(routers).read()) < 6:
                assert time.monotonic() < deadline, "the publishes never asked"
                time.sleep(0.02)
        for t in threads:
            t.join(30)
        assert sorted(results) == list(range(6))
        assert all(routed for _, routed in results.values()), results
        assert sorted(shared for shared, _ in results.values()) == [False] + [True] * 5
        assert routing._Requests(routers).read() == []
        assert routing.drift(platform) == {}
    finally:
        other.close()
    with connect(conn_of(api, made[3]["id"])) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_publish_requests_are_shared_across_processes_and_survive_a_killed_holder(
    tmp_path: Any,
) -> None:
    """Publishes asked for in any process on the host share one edit: the
    lock holder takes every request, and removes only what it took once the
    routers have it. A caller finds its request gone only when a publish
    that read after it asked is done; a holder that dies leaves what it
    took for the next; one whose publish could not start withdraws its own,
    so no unrelated publish ends its clients later."""

    def process() -> routing._Requests:  # each process opens the files itself
        return routing._Requests(files_only_routers(tmp_path))

    a, b, c = sorted(uuid.uuid4() for _ in range(3))
    one, two = process(), process()
    mine_a = routing._lines({a}, [])
    mine_b = routing._lines({b}, [("tenant_b", {"tenant_b_rw", "tenant_b_ro"})])
    one.add(mine_a)
    two.add(mine_b)
    taken = two.read()  # `two` holds the lock
    assert routing._parse(taken) == ({a, b}, [("tenant_b", {"tenant_b_rw", "tenant_b_ro"})])
    # Killed before it was done: everything it took is still asked for.
    assert one.read() == taken
    # The next holder is done, but `a` was asked for again after it read.
    again = routing._lines({a}, [])
    one.add(again)
    one.remove(taken)
    assert one.read() == again  # not counted as done
    assert set(mine_b).isdisjoint(two.read())  # b's caller: done by another
    one.remove(again)
    # A caller whose publish could not start withdraws its own request, and
    # only its own: another's request for the same project stays.
    mine_c, other_c = (routing._lines({c}, [("tenant_c", {"tenant_c_rw"})]) for _ in range(2))
    two.add(mine_c)
    one.add(other_c)
    two.remove(mine_c)
    assert one.read() == other_c
    one.remove(other_c)
    # A write cut short (no newline) is skipped, and what is added after it
    # does not run on from it.
    with open(one.path, "a") as f:
        f.write(mine_a[0][:20])
    one.add(mine_a)
    assert routing._parse(one.read()) == ({a}, [])
    assert mine_a[0] in one.read()


def test_a_repair_that_takes_requests_reloads_even_when_the_files_already_agree(
    api: Api, platform: Platform
) -> None:
    """A publish killed after its edit and before its reload leaves files
    that already say what it was asked for, and its request. The periodic
    sync that takes that request must reload the routers, even though the
    files need no change and every router has the same databases (a plan
    change moves only a pool size)."""
    project = create_ok(api, "halfway")
    tid = uuid.UUID(project["id"])
    db = tenant_db_name(tid)
    routers = platform.routers
    assert routers is not None
    before = {spec.name: routers.databases(spec)[db]["pool_size"] for spec in routers.specs}
    with platform.db.connection() as conn:
        conn.execute("UPDATE tenants SET plan_type = 'pro' WHERE id = %s", (tid,))
    # The killed publish: asked, edited, never reloaded.
    routing._Requests(routers).add(routing._lines({tid}, []))
    routes, logins, _ = routing.desired_for(platform, [tid])
    assert routers.edit(routes, logins) is True
    out = routing.publish(platform, repair=True)
    assert out.changed is False  # the files already agreed
    pro = routes[db]
    assert pro is not None and pro.pool_size not in before.values()
    for spec in routers.specs:
        assert routers.databases(spec)[db]["pool_size"] == pro.pool_size, spec.name
    assert routing._Requests(routers).read() == []


def test_one_writer_at_a_time_across_processes_and_a_killed_holder_lets_go(
    tmp_path: Any,
) -> None:
    """Publishes in different processes change the files one at a time
    (Routers.exclusive): a process holding the lock keeps another out, and
    one killed while holding it (SIGKILL: no cleanup runs) lets go at once."""
    import sys

    routers = files_only_routers(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from pgfleet.fleet.router import Routers\n"
            "r = Routers(Path(sys.argv[1]), [], host='x', ca_file=Path('ca'),"
            " admin_password_file=Path('pw'), owner=None, run=None)\n"
            "with r.exclusive():\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        got = threading.Event()

        def take() -> None:
            with routers.exclusive():
                got.set()

        t = threading.Thread(target=take, daemon=True)
        t.start()
        assert not got.wait(1.0), "a second writer got in while another process held the lock"
        holder.send_signal(signal.SIGKILL)
        assert got.wait(10), "the lock outlived the process that held it"
        t.join(5)
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_an_earlier_versions_hba_loses_its_line_for_all_databases(tmp_path: Any) -> None:
    """A fleet upgraded from a version whose HBA admitted everyone to every
    database: preparing the routers keeps the databases' own lines and drops
    that one, before any publish."""
    routers = files_only_routers(tmp_path)
    routers.paths.hba.parent.mkdir(parents=True, exist_ok=True)
    routers.paths.hba.write_text(
        "# old\nhostssl all        all  all        scram-sha-256\n"
        "hostssl tenant_x tenant_x_rw,tenant_x_ro all scram-sha-256\n"
    )
    routers.prepare(lambda *_: None)
    rules = [x for x in routers.paths.hba.read_text().splitlines() if x.startswith("hostssl")]
    assert rules == ["hostssl tenant_x tenant_x_rw,tenant_x_ro all scram-sha-256"]
