"""Router benchmark: PgBouncer in front of a regional server, against the
server itself, in one run on one fresh fleet.

1. `pgbench -S` (read-only, select by key) at 16 clients for `--seconds`,
   on one enterprise project (pgbench scale `--scale`): direct to the
   server, through its region's router in session mode, and in
   transaction mode, in alternating rounds; TPS and the ratio to direct.
2. `--clients` concurrent client connections spread over `--projects`
   projects, all through the transaction-pooling routers, each running a
   few short queries at once: how many server backends the tenant
   databases peaked at, against the bound the routers are configured with
   (each router opens at most the plan's pool per database).

    .venv/bin/python bench/router.py [--seconds 10] [--rounds 2]
        [--clients 1000] [--projects 100]

Targets: session-mode throughput >= 60% of direct; server backends within
the configured bound with 1,000 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BenchFleet, bench_fleet

from pgfleet.config import Settings
from pgfleet.fleet.binaries import find_binaries
from pgfleet.fleet.embedded import EmbeddedFleet
from pgfleet.regions import get_plan

REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-1")


def create(http: httpx.Client, name: str, region: str, plan: str) -> dict[str, Any]:
    r = http.post("/v1/projects", json={"name": name, "region": region, "plan": plan}, timeout=60)
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


def connection(http: httpx.Client, pid: str, **params: str) -> dict[str, Any]:
    r = http.get(f"/v1/projects/{pid}/connection", params=params)
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


def pgbench(c: dict[str, Any], *args: str) -> str:
    env = {
        "PGPASSWORD": c["password"],
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": c["sslrootcert"],
        "PATH": "/usr/bin:/bin",
    }
    cmd = [
        find_binaries().path("pgbench"),
        "-h",
        c["host"],
        "-p",
        str(c["port"]),
        "-U",
        c["user"],
        *args,
        c["database"],
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0:
        raise SystemExit(f"pgbench failed: {res.stdout}\n{res.stderr}")
    return res.stdout


def tps(out: str) -> float:
    m = re.search(r"tps = ([\d.]+)", out)
    if not m:
        raise SystemExit(f"no tps in pgbench output:\n{out}")
    return float(m.group(1))


def throughput(http: httpx.Client, args: argparse.Namespace) -> None:
    p = create(http, "bench-router", "us-east-1", "enterprise")
    strings = {
        "direct": connection(http, p["id"], direct="true"),
        "router, session": connection(http, p["id"], pooling="session"),
        "router, transaction": connection(http, p["id"], pooling="transaction"),
    }
    pgbench(strings["direct"], "-i", "-q", "-s", str(args.scale))
    results: dict[str, list[float]] = {k: [] for k in strings}
    for r in range(args.rounds):
        order = list(strings) if r % 2 == 0 else list(reversed(strings))
        for label in order:
            out = pgbench(
                strings[label], "-S", "-n", "-c", "16", "-j", "2", "-T", str(args.seconds)
            )
            results[label].append(tps(out))
    print(f"\npgbench -S, 16 clients, {args.seconds} s x {args.rounds} rounds (scale {args.scale})")
    direct = statistics.fmean(results["direct"])
    for label, values in results.items():
        mean = statistics.fmean(values)
        rounds = ", ".join(f"{v:,.0f}" for v in values)
        print(f"  {label:<22} {mean:>9,.0f} tps  ({rounds})  ratio to direct {mean / direct:.2f}")
    ratio = statistics.fmean(results["router, session"]) / direct
    verdict = "met" if ratio >= 0.6 else "NOT met"
    print(f"  target: session mode >= 0.60 of direct: {ratio:.2f}, {verdict}")


def tenant_backends(fleet: EmbeddedFleet) -> int:
    total = 0
    for srv in fleet.regional_servers():
        with psycopg.connect(**fleet.conninfo(srv), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname LIKE 'tenant\\_%'"
            ).fetchone()
            total += int(row[0]) if row else 0
    return total


async def one_client(
    c: dict[str, Any], queries: int, logins: asyncio.Semaphore, opened: list[int], go: asyncio.Event
) -> None:
    async with logins:
        conn = await psycopg.AsyncConnection.connect(
            host=c["host"],
            port=c["port"],
            dbname=c["database"],
            user=c["user"],
            password=c["password"],
            sslmode=c["sslmode"],
            sslrootcert=c["sslrootcert"],
            autocommit=True,
            connect_timeout=60,
        )
    opened[0] += 1
    try:
        await go.wait()
        for _ in range(queries):
            await conn.execute("SELECT pg_sleep(0.02)")
    finally:
        await conn.close()


async def crowd(strings: list[dict[str, Any]], clients: int, queries: int) -> int:
    """Every client connects (64 logins at a time), then, once all are
    connected, all run their queries at once. Returns the most open at once."""
    logins = asyncio.Semaphore(64)
    go = asyncio.Event()
    opened = [0]
    tasks = [
        asyncio.create_task(one_client(strings[i % len(strings)], queries, logins, opened, go))
        for i in range(clients)
    ]
    while opened[0] < clients and not any(t.done() for t in tasks):
        await asyncio.sleep(0.05)
    most = opened[0]
    go.set()
    await asyncio.gather(*tasks)
    return most


def many_clients(bf: BenchFleet, http: httpx.Client, args: argparse.Namespace) -> None:
    with ThreadPoolExecutor(4) as ex:
        made = list(
            ex.map(
                lambda i: create(http, f"crowd-{i}", REGIONS[i % len(REGIONS)], "free"),
                range(args.projects),
            )
        )
    strings = [connection(http, p["id"], pooling="transaction") for p in made]
    settings = Settings(home=bf.home, port_base=int(bf.env["PGFLEET_PORT_BASE"]))
    fleet = EmbeddedFleet(settings)
    routers_per_region = 1  # the transaction routers are what the clients use
    bound = args.projects * get_plan("free").router_pool_size * routers_per_region
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tenant_backends(fleet))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    at_once = asyncio.run(crowd(strings, args.clients, args.queries))
    took = time.perf_counter() - t0
    stop.set()
    sampler.join()
    print(
        f"\n{args.clients} client connections over {args.projects} projects (transaction "
        f"pooling), {args.queries} queries each; {at_once} open at once; {took:.1f} s"
    )
    print(
        f"  peak server backends in tenant databases: {peak} "
        f"(configured bound: {bound} = {args.projects} projects x "
        f"{get_plan('free').router_pool_size} per router; servers' max_connections 300 each)"
    )
    print(f"  target: backends within the bound: {'met' if peak <= bound else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--projects", type=int, default=100)
    ap.add_argument("--queries", type=int, default=5)
    args = ap.parse_args()
    with bench_fleet(fsync=True) as bf:
        http = httpx.Client(
            base_url=bf.url, headers={"Authorization": f"Bearer {bf.token}"}, timeout=60
        )
        throughput(http, args)
        many_clients(bf, http, args)


if __name__ == "__main__":
    main()
