"""SQL API benchmark.

`select 1` and a small indexed lookup through POST /v1/projects/{id}/sql
versus a direct psycopg connection to the same server as the same role, in
the same run: p50/p99 latency, the overhead, req/s at concurrency 1, 16 and
64, and the same `select 1` round-robin across many projects while watching
that the server's connections stay bounded.

    .venv/bin/python bench/sql_api.py [--requests 2000] [--projects 1000]

Targets (2-core machine): overhead p50 <= 2 ms, >= 1,000 req/s.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BenchFleet, bench_fleet, elapsed_ms, pct, summary

from pgfleet.config import Settings
from pgfleet.fleet.embedded import EmbeddedFleet

LOOKUP = "select id, name from items where id = $1"


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


def check(r: httpx.Response) -> None:
    if r.status_code >= 400:
        raise SystemExit(f"HTTP {r.status_code}: {r.text[:500]}")


def through_api(http: httpx.Client, pid: str, n: int) -> tuple[list[float], list[float]]:
    ones, lookups = [], []
    for i in range(n):
        t0 = time.perf_counter()
        check(http.post(f"/v1/projects/{pid}/sql", json={"query": "select 1"}))
        ones.append(elapsed_ms(t0))
        t0 = time.perf_counter()
        http.post(
            f"/v1/projects/{pid}/sql", json={"query": LOOKUP, "params": [i % 10000 + 1]}
        ).raise_for_status()
        lookups.append(elapsed_ms(t0))
    return ones, lookups


def throughput(bf: BenchFleet, pids: list[str], concurrency: int, seconds: float) -> float:
    headers = {"Authorization": f"Bearer {bf.token}"}
    done = 0
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        nonlocal done
        mine = 0
        with httpx.Client(base_url=bf.url, headers=headers, timeout=60) as http:
            i = k
            while time.perf_counter() < stop:
                pid = pids[i % len(pids)]
                http.post(f"/v1/projects/{pid}/sql", json={"query": "select 1"}).raise_for_status()
                mine += 1
                i += concurrency
        with lock:
            done += mine

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(worker, range(concurrency)))
    return done / (time.perf_counter() - t0)


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
    ap.add_argument("--workers", type=int, default=1, help="API worker processes")
    args = ap.parse_args()
    region = "us-east-1"
    workers = {"PGFLEET_API_WORKERS": str(args.workers)}
    with bench_fleet(fsync=False, regions=region, extra_env=workers) as bf:
        headers = {"Authorization": f"Bearer {bf.token}"}
        with httpx.Client(base_url=bf.url, headers=headers, timeout=60) as http:
            p = http.post("/v1/projects", json={"name": "bench", "region": region}).json()
            pid = p["id"]
            http.post(
                f"/v1/projects/{pid}/sql",
                json={"query": "create table items (id int primary key, name text)"},
            ).raise_for_status()
            http.post(
                f"/v1/projects/{pid}/sql",
                json={
                    "query": "insert into items select g, 'item ' || g "
                    "from generate_series(1, 10000) g"
                },
            ).raise_for_status()
            c = p["connection"]
            info = {
                "host": c["host"],
                "port": c["port"],
                "dbname": c["database"],
                "user": c["user"],
                "password": c["password"],
                "sslmode": c["sslmode"],
            }
            direct(info, 200)  # warm-up
            through_api(http, pid, 200)
            d_one, d_lookup = direct(info, args.requests)
            a_one, a_lookup = through_api(http, pid, args.requests)
        print(summary("direct psycopg: select 1", d_one))
        print(summary("SQL API: select 1", a_one))
        print(summary("direct psycopg: indexed lookup", d_lookup))
        print(summary("SQL API: indexed lookup", a_lookup))
        print(
            f"overhead p50 select 1: {pct(a_one, 50) - pct(d_one, 50):.2f} ms "
            f"(ratio {pct(a_one, 50) / pct(d_one, 50):.1f}x)"
        )
        print(
            f"overhead p50 lookup:   {pct(a_lookup, 50) - pct(d_lookup, 50):.2f} ms "
            f"(ratio {pct(a_lookup, 50) / pct(d_lookup, 50):.1f}x)"
        )
        for conc in (1, 16, 64):
            rate = throughput(bf, [pid], conc, args.seconds)
            print(f"throughput select 1, 1 project, concurrency {conc:>2}: {rate:8.0f} req/s")

        # Many projects, round-robin: connections on the server stay bounded.
        pids = [pid]
        with httpx.Client(base_url=bf.url, headers=headers, timeout=60) as http:

            def make(i: int) -> str:
                r = http.post("/v1/projects", json={"name": f"rr {i}", "region": region})
                r.raise_for_status()
                return str(r.json()["id"])

            t0 = time.perf_counter()
            with ThreadPoolExecutor(4) as ex:
                pids += list(ex.map(make, range(args.projects - 1)))
            print(f"created {len(pids)} projects in {time.perf_counter() - t0:.1f} s")
        peak = 0
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, server_backends(bf, region))
                time.sleep(0.2)

        w = threading.Thread(target=watch)
        w.start()
        rate = throughput(bf, pids, 16, args.seconds * 2)
        stop.set()
        w.join()
        print(
            f"throughput select 1, {len(pids)} projects round-robin, concurrency 16: "
            f"{rate:8.0f} req/s; peak tenant backends on the server: {peak} "
            f"(bound: workers x PGFLEET_TENANT_POOL_CAP x PGFLEET_TENANT_POOL_SIZE = "
            f"{args.workers} x 64 x 4)"
        )


if __name__ == "__main__":
    main()
