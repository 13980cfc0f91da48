"""Density benchmark: one fleet grown to 2,000 projects.

Grows one embedded fleet (three regions, fsync on, as `pgfleet up` runs it)
to `--target` projects spread over the regions, and at each checkpoint
(0, 500, 1,000, 2,000 by default) measures:

- provisioning: API create -> credentials that connect, p50/p99, over
  `--probe` creates at concurrency 4 (they count towards the next mark);
- the SQL API: p50 of `select 1` on a random project (`--sql` requests,
  one at a time, each on a project picked at random);
- `/v1/admin/stats/regions` and `/v1/admin/stats/performance`: p95;
- the API processes' resident memory (all of them, summed);
- each server's disk used (its data directory) and its shared catalog
  (pg_database, pg_authid, pg_shdepend, pg_shdescription, ...) size.

Then it prints the table and, for each figure, how it grew from one
checkpoint to the next per 1,000 projects: a figure that grows faster than
linearly shows as a rising growth rate, and the verdict names it.

    .venv/bin/python bench/density.py [--target 2000] [--checkpoints 0,500,1000,2000]

Target (2-core machine): stats endpoints p95 <= 50 ms at 2,000 projects;
nothing growing faster than linearly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BenchFleet, bench_fleet, connect_with, elapsed_ms, pct, wait_for_spares

from pgfleet.config import Settings
from pgfleet.fleet.embedded import EmbeddedFleet

REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-1")
SPARES = 10  # per server, as a steady deployment might keep
SHARED_CATALOGS = (
    "pg_database",
    "pg_authid",
    "pg_auth_members",
    "pg_shdepend",
    "pg_shdescription",
    "pg_db_role_setting",
)


def create(http: httpx.Client, i: int) -> tuple[float, str]:
    """(request -> credentials that connect, project id)."""
    t0 = time.perf_counter()
    r = http.post(
        "/v1/projects",
        json={"name": f"dense {i}", "region": REGIONS[i % len(REGIONS)], "plan": "free"},
    )
    if r.status_code != 201:
        raise SystemExit(f"create {i}: HTTP {r.status_code}: {r.text[:500]}")
    body = r.json()
    c = body["connection"]
    with connect_with(c) as conn:
        conn.execute("select 1")
    return elapsed_ms(t0), str(body["id"])


def api_rss_mib(bf: BenchFleet) -> float:
    """Resident memory of the API's processes (the server and its workers)."""
    pid_file = bf.home / "api.pid"
    pids: set[int] = set()
    if pid_file.exists():
        root = int(json.loads(pid_file.read_text())["pid"])
        pids.add(root)
        out = subprocess.run(["pgrep", "-P", str(root)], capture_output=True, text=True).stdout
        pids |= {int(p) for p in out.split()}
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def server_figures(bf: BenchFleet) -> dict[str, tuple[float, float, int]]:
    """Per region: (data directory MiB, shared catalogs MiB, databases)."""
    fleet = EmbeddedFleet(Settings(home=bf.home, embedded_regions=list(REGIONS)))
    out: dict[str, tuple[float, float, int]] = {}
    for srv in fleet.regional_servers():
        du = subprocess.run(
            ["du", "-sk", str(bf.home / "servers" / srv.name / "data")],
            capture_output=True,
            text=True,
        ).stdout.split()
        disk = int(du[0]) / 1024 if du else float("nan")
        with psycopg.connect(**fleet.conninfo(srv), autocommit=True) as conn:
            row = conn.execute(
                "SELECT sum(pg_catalog.pg_total_relation_size(c.oid)), "
                "(SELECT count(*) FROM pg_catalog.pg_database) "
                "FROM pg_catalog.pg_class c WHERE c.relname = ANY(%s) "
                "AND c.relnamespace = 'pg_catalog'::regnamespace",
                (list(SHARED_CATALOGS),),
            ).fetchone()
        assert row is not None
        out[srv.region] = (disk, int(row[0]) / 2**20, int(row[1]))
    return out


def timed_get(http: httpx.Client, path: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        http.get(path).raise_for_status()
        times.append(elapsed_ms(t0))
    return times


def sql_p50(http: httpx.Client, ids: list[str], n: int) -> float:
    times = []
    for _ in range(n):
        pid = random.choice(ids)
        t0 = time.perf_counter()
        r = http.post(f"/v1/projects/{pid}/sql", json={"query": "select 1"})
        if r.status_code != 200:
            raise SystemExit(f"SQL on {pid}: HTTP {r.status_code}: {r.text[:500]}")
        times.append(elapsed_ms(t0))
    return pct(times, 50)


def settle(bf: BenchFleet, timeout: float = 300) -> None:
    """Wait until every server has its spares back (the refill after a burst
    of creates competes for the same two cores as what is measured)."""
    wait_for_spares(bf.home, REGIONS, SPARES, timeout)


def measure(
    bf: BenchFleet, http: httpx.Client, ids: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    settle(bf)
    row: dict[str, Any] = {"projects": len(ids)}
    start = len(ids)
    with ThreadPoolExecutor(4) as ex:
        made = list(ex.map(lambda i: create(http, i), range(start, start + args.probe)))
    ids.extend(pid for _, pid in made)
    times = [t for t, _ in made]
    row["create p50"], row["create p99"] = pct(times, 50), pct(times, 99)
    row["sql p50"] = sql_p50(http, ids, args.sql)
    for name in ("regions", "performance"):
        row[f"stats/{name} p95"] = pct(timed_get(http, f"/v1/admin/stats/{name}", args.stats), 95)
    row["API RSS MiB"] = api_rss_mib(bf)
    servers = server_figures(bf)
    row["disk MiB (all)"] = sum(d for d, _, _ in servers.values())
    row["shared catalog MiB (max)"] = max(c for _, c, _ in servers.values())
    row["databases (max/server)"] = max(n for _, _, n in servers.values())
    return row


def grow(http: httpx.Client, ids: list[str], to: int, concurrency: int) -> None:
    start = len(ids)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        for _, pid in ex.map(lambda i: create(http, i), range(start, to)):
            ids.append(pid)
    took = time.perf_counter() - t0
    if to > start:
        print(f"  grew {start} -> {to} projects in {took:.0f} s ({(to - start) / took:.1f}/s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=int, default=2000, help="projects at the end (default 2000)")
    ap.add_argument(
        "--checkpoints", default="0,500,1000,2000", help="where to measure (default 0,500,...)"
    )
    ap.add_argument("--probe", type=int, default=40, help="timed creates per checkpoint")
    ap.add_argument("--sql", type=int, default=200, help="SQL requests per checkpoint")
    ap.add_argument("--stats", type=int, default=40, help="requests per stats endpoint")
    ap.add_argument("--concurrency", type=int, default=8, help="parallel creates while growing")
    args = ap.parse_args()
    marks = sorted({int(x) for x in args.checkpoints.split(",")} | {args.target})
    rows: list[dict[str, Any]] = []
    # Spares as a steady deployment would keep them: the growth outruns the
    # refill, so most creates between checkpoints take the slow path; each
    # checkpoint waits for the spares to be back first.
    with bench_fleet(extra_env={"PGFLEET_SPARE_DATABASES": str(SPARES)}) as bf:
        print(f"embedded fleet in {bf.home} (fsync on, 3 regions); API {bf.url}")
        headers = {"Authorization": f"Bearer {bf.token}"}
        ids: list[str] = []
        with httpx.Client(base_url=bf.url, headers=headers, timeout=120) as http:
            for mark in marks:
                # A checkpoint's timed creates count towards the next mark.
                grow(http, ids, mark, args.concurrency)
                rows.append(measure(bf, http, ids, args))
                print("  measured at", rows[-1]["projects"], "projects", flush=True)
    report(rows)


def report(rows: list[dict[str, Any]]) -> None:
    keys = [k for k in rows[0] if k != "projects"]
    width = max(len(k) for k in keys)
    print()
    print(f"{'projects':<{width}} " + " ".join(f"{r['projects']:>10}" for r in rows))
    for k in keys:
        print(f"{k:<{width}} " + " ".join(f"{r[k]:>10.1f}" for r in rows))
    print()
    print("growth per 1,000 projects between checkpoints (rising = faster than linear):")
    bends = []
    for k in keys:
        rates = []
        for a, b in itertools.pairwise(rows):
            span = (b["projects"] - a["projects"]) / 1000
            rates.append((b[k] - a[k]) / span if span else 0.0)
        print(f"  {k:<{width}} " + " ".join(f"{r:>10.1f}" for r in rates))
        # Faster than linear: the last interval's growth per 1,000 projects
        # more than twice the first's, by more than the noise of a 2-core
        # machine (5 ms for latencies, 1 unit for the rest).
        floor = 5.0 if k.endswith(("p50", "p95", "p99")) else 1.0
        if len(rates) >= 2 and rates[-1] - 2 * max(rates[0], 0) > floor:
            bends.append(k)
    last = rows[-1]
    stats_ok = max(last["stats/regions p95"], last["stats/performance p95"]) <= 50
    print(
        f"stats endpoints p95 <= 50 ms at {last['projects']}:",
        "met" if stats_ok else "NOT met",
    )
    print("faster than linear:", ", ".join(bends) if bends else "nothing")


if __name__ == "__main__":
    main()
