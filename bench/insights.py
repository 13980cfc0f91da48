"""Query-insights sampling benchmark: what one round costs with many projects.

Grows one embedded fleet (three regions, fsync on) to `--projects`
projects, runs `--statements` distinct statements in each over a direct
connection (as psql or an app would), then times, in this process:

- the baseline: each server's bare read of pg_stat_statements (the one
  query a round sends to a server), summed over the servers;
- a cold round: every statement new to the platform DB (COPY + upsert);
- a warm round: nothing changed since (the upsert writes no row);
- a round after 10% of the projects ran one statement again.

and prints each round's total and its ratio to the bare read of the same
run, with the rows read and written.

    .venv/bin/python bench/insights.py [--projects 1000] [--statements 3]

Target: a round over 1,000 projects well under the sampling interval
(PGFLEET_INSIGHTS_INTERVAL_S, 60 s): under 1 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_fleet, connect_with, elapsed_ms

from pgfleet.config import Settings
from pgfleet.fleet.embedded import EmbeddedFleet
from pgfleet.monitoring import insights
from pgfleet.platform.core import Platform

REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-1")
# Distinct statements (constants do not make one: they are normalised away).
SHAPES = (
    "select v from t where id > %s",
    "select count(*) from t where id < %s",
    "select max(id) from t where v <> %s::text",
    "select id from t order by id desc limit %s",
    "select min(v) from t where id = %s",
)


def make(http: httpx.Client, i: int, statements: int) -> dict[str, Any]:
    r = http.post(
        "/v1/projects", json={"name": f"insight {i}", "region": REGIONS[i % len(REGIONS)]}
    )
    if r.status_code != 201:
        raise SystemExit(f"create {i}: HTTP {r.status_code}: {r.text[:300]}")
    c: dict[str, Any] = r.json()["connection"]
    with connect_with(c) as conn:
        conn.execute("create table t (id int primary key, v text)")
        conn.execute("insert into t select g, 'x' from generate_series(1, 10) g")
        for k in range(statements):
            conn.execute(SHAPES[k % len(SHAPES)], (k,)).fetchall()
    return c


def bare_read(platform: Platform, server: Any) -> int:
    """The view with its texts, as a round's first read once had it."""
    with platform.servers.admin_connection(server) as conn:
        return len(
            conn.execute(
                "SELECT s.queryid, s.query, s.calls FROM public.pg_stat_statements(true) s "
                "JOIN pg_catalog.pg_database d ON d.oid = s.dbid "
                "WHERE d.datname LIKE 'tenant%%'"
            ).fetchall()
        )


def round_ms(platform: Platform) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    done = insights.sample(platform)
    took = elapsed_ms(t0)
    return took, sum(d["statements"] for d in done), sum(d["changed"] for d in done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--projects", type=int, default=1000)
    ap.add_argument("--statements", type=int, default=3)
    args = ap.parse_args()
    env = {"PGFLEET_INSIGHTS_INTERVAL_S": "86400", "PGFLEET_BACKUP_SCHEDULE": "false"}
    with bench_fleet(extra_env=env) as bf:
        headers = {"Authorization": f"Bearer {bf.token}"}
        t0 = time.perf_counter()
        with (
            httpx.Client(base_url=bf.url, headers=headers, timeout=120) as http,
            ThreadPoolExecutor(4) as pool,
        ):
            conns = list(pool.map(lambda i: make(http, i, args.statements), range(args.projects)))
        print(f"made {args.projects} projects and ran their statements in {elapsed_ms(t0):.0f} ms")
        settings = Settings(
            home=bf.home,
            port_base=int(bf.env["PGFLEET_PORT_BASE"]),
            embedded_regions=list(REGIONS),
        )
        platform = Platform(settings, EmbeddedFleet(settings).platform_conninfo())
        try:
            servers = platform.servers.all(enabled_only=True)
            bare = []
            for _ in range(3):
                t1 = time.perf_counter()
                read = sum(bare_read(platform, s) for s in servers)
                bare.append(elapsed_ms(t1))
            base = min(bare)
            print(f"bare read of pg_stat_statements, {len(servers)} servers: {base:.1f} ms")
            print(f"  ({read} statement rows in tenant databases)")
            cold = round_ms(platform)
            warm = round_ms(platform)
            for c in random.sample(conns, max(1, len(conns) // 10)):
                with connect_with(c) as conn:
                    conn.execute("select count(*) from t").fetchall()
            churn = round_ms(platform)
            for label, (ms, rows, written) in (
                ("cold round (all new)", cold),
                ("warm round (unchanged)", warm),
                ("round after 10% ran again", churn),
            ):
                print(
                    f"{label:28s} {ms:8.1f} ms  x{ms / base:5.1f} the bare read  "
                    f"read {rows}, wrote {written}"
                )
            verdict = "met" if max(cold[0], warm[0], churn[0]) < 1000 else "NOT met"
            print(f"target (a round over {args.projects} projects under 1 s): {verdict}")
        finally:
            platform.close()


if __name__ == "__main__":
    main()
