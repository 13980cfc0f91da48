"""SQL API benchmark.

`select 1` and a small indexed lookup through POST /v1/projects/{id}/sql,
through POST /sql (the Neon serverless driver's HTTP protocol, as the driver
sends it), and over a direct psycopg connection to the same server as the
same role, in the same run: p50/p99 latency, the overhead, req/s at concurrency 1, 16 and
64 (direct: as many psycopg connections), and the same `select 1`
round-robin across many projects while watching that the server's
connections stay bounded, beside its baseline: a psycopg client logging in
to the same databases in turn, without pgfleet (each round-robin request is
a login: what the server's logins alone cost bounds what any path can do).

    .venv/bin/python bench/sql_api.py [--requests 2000] [--projects 1000] [--workers N]

The API runs as `pgfleet up` runs it (PGFLEET_API_WORKERS: one process per
CPU by default); requests come from a lean keep-alive HTTP client
(bench/_http.py) in this process, sharing the machine's cores with the API
and the servers.

Targets (2-core machine): overhead p50 <= 1 ms and >= 2,000 req/s at
concurrency 16 on one project; 1,000 projects round-robin at concurrency 16
>= 500 req/s with the server's tenant backends within the bound; the HTTP
driver path within 10% of the SQL API (p50 and req/s at concurrency 16).
The round-robin starts once the worker has made the prepared spares the
creates took, so its CPU figures are the requests' own.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BenchFleet,
    bench_fleet,
    cpu_report,
    elapsed_ms,
    fleet_cpu,
    pct,
    summary,
    wait_for_spares,
)
from _http import Conn, post_driver, post_json, run_load

from pgfleet.config import Settings
from pgfleet.fleet.embedded import EmbeddedFleet

LOOKUP = "select id, name from items where id = $1"


SPARES = 10  # the worker keeps this many prepared spares


def direct(conn_info: dict[str, Any], n: int) -> tuple[list[float], list[float]]:
    ones, lookups = [], []
    with psycopg.connect(**conn_info, autocommit=True) as conn:
        for i in range(n):
            t0 = time.perf_counter()
            conn.execute("select 1").fetchall()
            ones.append(elapsed_ms(t0))
            t0 = time.perf_counter()
            conn.execute("select id, name from items where id = %s", (i % 10000 + 1,)).fetchall()
            lookups.append(elapsed_ms(t0))
    return ones, lookups


def sequential(
    url: str, one: bytes, lookups: list[bytes], n: int
) -> tuple[list[float], list[float]]:
    """`select 1` then a lookup, n times, one request at a time: latencies."""

    async def go() -> tuple[list[float], list[float]]:
        ones: list[float] = []
        looked: list[float] = []
        conn = await Conn.open(url)
        try:
            for i in range(n):
                for req, into in ((one, ones), (lookups[i % len(lookups)], looked)):
                    t0 = time.perf_counter()
                    status, body = await conn.send(req)
                    into.append(elapsed_ms(t0))
                    if status != 200:
                        raise SystemExit(f"HTTP {status}: {body[:500]!r}")
        finally:
            conn.close()
        return ones, looked

    return asyncio.run(go())


def through_api(url: str, token: str, pid: str, n: int) -> tuple[list[float], list[float]]:
    path = f"/v1/projects/{pid}/sql"
    one = post_json(path, token, {"query": "select 1"})
    lookups = [post_json(path, token, {"query": LOOKUP, "params": [i + 1]}) for i in range(100)]
    return sequential(url, one, lookups, n)


def through_driver(url: str, cs: str, n: int) -> tuple[list[float], list[float]]:
    one = post_driver(cs, {"query": "select 1", "params": []})
    lookups = [post_driver(cs, {"query": LOOKUP, "params": [str(i + 1)]}) for i in range(100)]
    return sequential(url, one, lookups, n)


def driver_throughput(bf: BenchFleet, cs: str, concurrency: int, seconds: float) -> float:
    req = post_driver(cs, {"query": "select 1", "params": []})
    n, elapsed, _ = asyncio.run(run_load(bf.url, lambda i: req, concurrency, seconds))
    return n / elapsed


def direct_throughput(
    conn_info: dict[str, Any], concurrency: int, seconds: float
) -> tuple[float, list[float]]:
    async def go() -> tuple[float, list[float]]:
        latencies: list[float] = []
        stop = time.perf_counter() + seconds

        async def worker() -> int:
            n = 0
            async with await psycopg.AsyncConnection.connect(**conn_info, autocommit=True) as c:
                while time.perf_counter() < stop:
                    t0 = time.perf_counter()
                    await (await c.execute("select 1")).fetchall()
                    latencies.append(elapsed_ms(t0))
                    n += 1
            return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(worker() for _ in range(concurrency)))
        return sum(counts) / (time.perf_counter() - t0), latencies

    return asyncio.run(go())


def api_throughput(
    bf: BenchFleet, pids: list[str], concurrency: int, seconds: float
) -> tuple[float, list[float]]:
    requests = [
        post_json(f"/v1/projects/{pid}/sql", bf.token, {"query": "select 1"}) for pid in pids
    ]
    n, elapsed, latencies = asyncio.run(
        run_load(bf.url, lambda i: requests[i % len(requests)], concurrency, seconds)
    )
    return n / elapsed, latencies


def socket_of(bf: BenchFleet, region: str) -> dict[str, Any]:
    """Where the region's server listens on its Unix socket (the
    connection strings name a router)."""
    fleet = EmbeddedFleet(Settings(home=bf.home, embedded_regions=[region]))
    srv = next(s for s in fleet.regional_servers() if s.region == region)
    return {"host": str(fleet.socket_dir(srv.name)), "port": srv.port}


def login_info(socket: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    """A project's credentials, to log in over its server's Unix socket."""
    return {**socket, "dbname": c["database"], "user": c["user"], "password": c["password"]}


def login_throughput(
    bf: BenchFleet, logins: list[dict[str, Any]], concurrency: int, seconds: float
) -> tuple[float, float, float]:
    """Log in to each database in turn, `select 1`, log out, `concurrency`
    at once: req/s, and the server's and this client's CPU ms per login."""

    async def go() -> int:
        turn = itertools.count()
        stop = time.perf_counter() + seconds

        async def worker() -> int:
            n = 0
            while time.perf_counter() < stop:
                info = logins[next(turn) % len(logins)]
                async with await psycopg.AsyncConnection.connect(**info, autocommit=True) as c:
                    await (await c.execute("select 1")).fetchall()
                n += 1
            return n

        return sum(await asyncio.gather(*(worker() for _ in range(concurrency))))

    cpu0, own0, t0 = fleet_cpu(bf.home), os.times(), time.perf_counter()
    n = asyncio.run(go())
    elapsed = time.perf_counter() - t0
    cpu1, own1 = fleet_cpu(bf.home), os.times()
    servers = sum(v for k, v in cpu1.items() if k.startswith("server")) - sum(
        v for k, v in cpu0.items() if k.startswith("server")
    )
    own = own1.user + own1.system - own0.user - own0.system
    return n / elapsed, servers * 1000 / n, own * 1000 / n


def server_backends(bf: BenchFleet, region: str) -> int:
    fleet = EmbeddedFleet(Settings(home=bf.home, embedded_regions=[region]))
    srv = next(s for s in fleet.regional_servers() if s.region == region)
    with psycopg.connect(**fleet.conninfo(srv), autocommit=True) as conn:
        row = conn.execute(
            "select count(*) from pg_stat_activity where usename like 'tenant\\_%'"
        ).fetchone()
    return int(row[0]) if row else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="sequential requests per mode")
    ap.add_argument("--projects", type=int, default=1000, help="projects for round-robin")
    ap.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    ap.add_argument(
        "--workers", type=int, default=None, help="API processes (default: as pgfleet up)"
    )
    args = ap.parse_args()
    region = "us-east-1"
    workers = args.workers or Settings().api_workers
    # (bench_fleet lifts the rate limits: 2,000 SQL calls a second per
    # credential by default.)
    env = {"PGFLEET_API_WORKERS": str(workers), "PGFLEET_SPARE_DATABASES": str(SPARES)}
    settings = Settings()
    bound = settings.tenant_pool_cap // workers * workers * settings.tenant_pool_size
    print(f"API processes: {workers}; CPUs: {os.cpu_count()}")
    with bench_fleet(fsync=False, regions=region, extra_env=env) as bf:
        headers = {"Authorization": f"Bearer {bf.token}"}
        with httpx.Client(base_url=bf.url, headers=headers, timeout=60) as http:
            # Enterprise: its 200 connections let the direct baseline open 64.
            body = {"name": "bench", "region": region, "plan_type": "enterprise"}
            p = http.post("/v1/projects", json=body).json()
            pid = p["id"]
            for query in (
                "create table items (id int primary key, name text)",
                "insert into items select g, 'item ' || g from generate_series(1, 10000) g",
            ):
                http.post(f"/v1/projects/{pid}/sql", json={"query": query}).raise_for_status()
        c = p["connection"]
        info = {
            "host": c["host"],
            "port": c["port"],
            "dbname": c["database"],
            "user": c["user"],
            "password": c["password"],
            "sslmode": c["sslmode"],
            "sslrootcert": c.get("sslrootcert"),
        }
        cs = f"postgresql://{c['user']}:{c['password']}@{c['host']}:{c['port']}/{c['database']}"
        direct(info, 200)  # warm-up
        through_api(bf.url, bf.token, pid, 200)
        through_driver(bf.url, cs, 200)
        # In alternating rounds, so that the machine's drift during the run
        # does not favour whichever path went last.
        d_one: list[float] = []
        d_lookup: list[float] = []
        a_one: list[float] = []
        a_lookup: list[float] = []
        n_one: list[float] = []
        n_lookup: list[float] = []
        per_round = max(1, args.requests // 4)
        for _ in range(4):
            for (one, lookup), run in (
                ((d_one, d_lookup), lambda: direct(info, per_round)),
                ((a_one, a_lookup), lambda: through_api(bf.url, bf.token, pid, per_round)),
                ((n_one, n_lookup), lambda: through_driver(bf.url, cs, per_round)),
            ):
                ones, lookups = run()
                one.extend(ones)
                lookup.extend(lookups)
        print(summary("direct psycopg: select 1", d_one))
        print(summary("SQL API: select 1", a_one))
        print(summary("HTTP driver (/sql): select 1", n_one))
        print(summary("direct psycopg: indexed lookup", d_lookup))
        print(summary("SQL API: indexed lookup", a_lookup))
        print(summary("HTTP driver (/sql): indexed lookup", n_lookup))
        driver_ratio = max(pct(n_one, 50) / pct(a_one, 50), pct(n_lookup, 50) / pct(a_lookup, 50))
        print(f"HTTP driver p50 / SQL API p50 (worse of the two): {driver_ratio:.2f}x")
        overhead = pct(a_one, 50) - pct(d_one, 50)
        print(
            f"overhead p50 select 1: {overhead:.2f} ms "
            f"(ratio {pct(a_one, 50) / pct(d_one, 50):.1f}x); "
            f"p99 {pct(a_one, 99) - pct(d_one, 99):.2f} ms"
        )
        print(
            f"overhead p50 lookup:   {pct(a_lookup, 50) - pct(d_lookup, 50):.2f} ms "
            f"(ratio {pct(a_lookup, 50) / pct(d_lookup, 50):.1f}x)"
        )
        best = 0.0
        for conc in (1, 16, 64):
            d_rate, d_lat = direct_throughput(info, conc, args.seconds)
            a_rate, a_lat = api_throughput(bf, [pid], conc, args.seconds)
            best = max(best, a_rate)
            print(
                f"select 1, 1 project, concurrency {conc:>2}: SQL API {a_rate:6.0f} req/s "
                f"(p50 {pct(a_lat, 50):6.2f} ms, p99 {pct(a_lat, 99):6.2f} ms); direct "
                f"{d_rate:6.0f} req/s (p50 {pct(d_lat, 50):5.2f} ms); ratio {d_rate / a_rate:.1f}x"
            )

        a16 = api_throughput(bf, [pid], 16, args.seconds)[0]
        n16 = driver_throughput(bf, cs, 16, args.seconds)
        print(
            f"select 1, concurrency 16: HTTP driver {n16:6.0f} req/s vs SQL API {a16:6.0f} "
            f"req/s (ratio {n16 / a16:.2f})"
        )

        # Many projects, round-robin: connections on the server stay bounded.
        pids = [pid]
        socket = socket_of(bf, region)
        logins = [login_info(socket, c)]
        with httpx.Client(base_url=bf.url, headers=headers, timeout=60) as http:

            def make(i: int) -> tuple[str, dict[str, Any]]:
                r = http.post("/v1/projects", json={"name": f"rr {i}", "region": region})
                r.raise_for_status()
                return str(r.json()["id"]), r.json()["connection"]

            t0 = time.perf_counter()
            with ThreadPoolExecutor(4) as ex:
                for made, conn in ex.map(make, range(args.projects - 1)):
                    pids.append(made)
                    logins.append(login_info(socket, conn))
            print(f"created {len(pids)} projects in {time.perf_counter() - t0:.1f} s")
        # The worker refills the spares the creates took: not during the timing.
        wait_for_spares(bf.home, [region], SPARES)
        # The baseline: the same logins and `select 1` without pgfleet, a
        # psycopg client logging in to each project's database in turn over
        # the server's Unix socket (as the API does), 16 at once. Before and
        # after the SQL API's run, so that the machine's drift shows.
        base = [login_throughput(bf, logins, 16, args.seconds)]
        peak = 0
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, server_backends(bf, region))
                time.sleep(0.2)

        w = threading.Thread(target=watch)
        w.start()
        print(f"round-robin: {args.seconds * 2:.0f} s from now", flush=True)
        cpu0, own0 = fleet_cpu(bf.home), os.times()
        rate, lat = api_throughput(bf, pids, 16, args.seconds * 2)
        cpu1, own1 = fleet_cpu(bf.home), os.times()
        stop.set()
        w.join()
        print(cpu_report(cpu0, cpu1, len(lat), "round-robin request"))
        own = (own1.user + own1.system - own0.user - own0.system) * 1000 / len(lat)
        print(f"  {'this benchmark (the clients)':<28} {own:8.1f}")
        print(
            f"select 1, {len(pids)} projects round-robin, concurrency 16: {rate:6.0f} req/s "
            f"(p50 {pct(lat, 50):.2f} ms, p99 {pct(lat, 99):.2f} ms); peak tenant backends on "
            f"the server: {peak} (bound: PGFLEET_TENANT_POOL_CAP x PGFLEET_TENANT_POOL_SIZE "
            f"= {bound})"
        )
        base.append(login_throughput(bf, logins, 16, args.seconds))
        d_rate = sum(b[0] for b in base) / len(base)
        d_server = sum(b[1] for b in base) / len(base)
        d_own = sum(b[2] for b in base) / len(base)
        cores = os.cpu_count() or 1
        print(
            f"baseline, direct logins round-robin (no pgfleet), concurrency 16: {d_rate:6.0f} "
            f"req/s ({base[0][0]:.0f} before, {base[1][0]:.0f} after); the server's CPU per "
            f"login {d_server:.1f} ms, the client's {d_own:.1f} ms; SQL API / direct "
            f"{rate / d_rate:.2f}"
        )
        print(
            f"  the server's logins alone allow at most {cores * 1000 / d_server:.0f} req/s on "
            f"{cores} cores, with nothing else running"
        )
        verdict = [
            ("overhead p50 <= 1 ms", overhead <= 1.0),
            (">= 2,000 req/s at c=16, one project", a16 >= 2000),
            (f"{len(pids)} projects round-robin >= 500 req/s", rate >= 500),
            ("server connections bounded", peak <= bound),
            ("HTTP driver within 10% of the SQL API", driver_ratio <= 1.1 and n16 >= 0.9 * a16),
        ]
        print("targets: " + "; ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in verdict))


if __name__ == "__main__":
    main()
