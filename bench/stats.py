"""Statistics endpoints at scale.

Loads 100,000 tenants and 1,000,000 query-log rows (over the last 24 h) into
a fresh embedded fleet's platform DB, then times the stats endpoints through
the REST API. Baseline in the same run: the seed's own two monitoring
queries straight on the platform DB.

    .venv/bin/python bench/stats.py [--tenants 100000] [--logs 1000000]

Target (2-core machine): p95 <= 50 ms per endpoint.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_fleet, elapsed_ms, pct, summary

from pgfleet.config import Settings
from pgfleet.fleet.embedded import EmbeddedFleet
from pgfleet.monitoring.querylog import QueryLogRecord, ensure_partition, write_batch
from pgfleet.monitoring.seed import REGION_DISTRIBUTION as SEED_DISTRIBUTION
from pgfleet.monitoring.seed import REGIONAL_PERFORMANCE as SEED_PERFORMANCE

REGIONS = {  # requested region -> (weight, hosted region)
    "us-east-1": (40, "us-east-1"),
    "us-west-1": (8, "us-east-1"),
    "eu-central-1": (25, "eu-central-1"),
    "eu-west-1": (7, "us-east-1"),
    "ap-southeast-1": (15, "ap-southeast-1"),
    "ap-northeast-1": (5, "us-east-1"),
}


def load(conninfo: dict[str, object], n_tenants: int, n_logs: int) -> list[uuid.UUID]:
    rnd = random.Random(42)
    names = list(REGIONS)
    weights = [REGIONS[r][0] for r in names]
    with psycopg.connect(**conninfo) as conn:  # type: ignore[arg-type]
        servers = dict(conn.execute("SELECT region, id FROM servers").fetchall())
        tenants: list[tuple[uuid.UUID, str]] = []
        with conn.cursor().copy(
            "COPY tenants (id, name, subdomain, region, plan_type, status, server_id, "
            "hosted_region) FROM STDIN"
        ) as copy:
            for i in range(n_tenants):
                tid = uuid.uuid4()
                region = rnd.choices(names, weights)[0]
                hosted = REGIONS[region][1]
                plan = rnd.choices(["free", "pro", "enterprise"], [70, 25, 5])[0]
                status = rnd.choices(["active", "paused", "failed"], [95, 4, 1])[0]
                tenants.append((tid, region))
                copy.write_row(
                    (tid, f"tenant {i}", f"t{i}", region, plan, status, servers[hosted], hosted)
                )
        conn.commit()
        now = datetime.now(UTC)
        for d in range(3):
            ensure_partition(conn, (now - timedelta(days=d)).date())
        conn.commit()
        batch: list[QueryLogRecord] = []
        for _ in range(n_logs):
            tid, region = tenants[rnd.randrange(len(tenants))]
            batch.append(
                QueryLogRecord(
                    tenant_id=tid,
                    region=region,
                    hosted_region=REGIONS[region][1],
                    server_id=servers[REGIONS[region][1]],
                    route="ro" if rnd.random() < 0.3 else "rw",
                    execution_time_ms=round(rnd.lognormvariate(0.5, 1.0), 3),
                    row_count=rnd.randrange(100),
                    outcome="ok" if rnd.random() > 0.02 else "42P01",
                    fingerprint="select * from t where id = ?",
                    executed_at=now - timedelta(seconds=rnd.uniform(0, 86_000)),
                )
            )
            if len(batch) == 50_000:
                write_batch(conn, batch)
                batch = []
        if batch:
            write_batch(conn, batch)
        conn.execute("ANALYZE")
        conn.commit()
    return [t for t, _ in tenants]


def time_sql(conninfo: dict[str, object], query: str, n: int) -> list[float]:
    out = []
    with psycopg.connect(**conninfo, autocommit=True) as conn:  # type: ignore[arg-type]
        for _ in range(n):
            t0 = time.perf_counter()
            conn.execute(query).fetchall()
            out.append(elapsed_ms(t0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tenants", type=int, default=100_000)
    ap.add_argument("--logs", type=int, default=1_000_000)
    ap.add_argument("--n", type=int, default=40, help="requests per endpoint")
    args = ap.parse_args()
    with bench_fleet(fsync=False, extra_env={"PGFLEET_BACKGROUND_TASKS": "false"}) as bf:
        fleet = EmbeddedFleet(Settings(home=bf.home))
        conninfo = fleet.platform_conninfo()
        t0 = time.perf_counter()
        tenants = load(conninfo, args.tenants, args.logs)
        print(
            f"loaded {args.tenants} tenants and {args.logs} query logs in "
            f"{time.perf_counter() - t0:.0f} s"
        )
        base_dist = time_sql(conninfo, SEED_DISTRIBUTION, args.n)
        base_perf = time_sql(conninfo, SEED_PERFORMANCE, max(5, args.n // 8))
        print(summary("baseline: seed region distribution SQL", base_dist))
        print(summary("baseline: seed regional performance SQL", base_perf))
        headers = {"Authorization": f"Bearer {bf.token}"}
        rnd = random.Random(7)
        endpoints = {
            "/v1/admin/stats/regions": lambda: "/v1/admin/stats/regions",
            "/v1/admin/stats/performance?window=24h": lambda: (
                "/v1/admin/stats/performance?window=24h"
            ),
            "/v1/admin/advisor": lambda: "/v1/admin/advisor",
            "/v1/admin/costs": lambda: "/v1/admin/costs",
            "/v1/projects/{id}/stats?window=24h": lambda: (
                f"/v1/projects/{rnd.choice(tenants)}/stats?window=24h"
            ),
        }
        worst = 0.0
        with httpx.Client(base_url=bf.url, headers=headers, timeout=120) as http:
            for label, path in endpoints.items():
                http.get(path()).raise_for_status()  # warm-up
                times = []
                for _ in range(args.n):
                    t = time.perf_counter()
                    http.get(path()).raise_for_status()
                    times.append(elapsed_ms(t))
                worst = max(worst, pct(times, 95))
                print(
                    summary(label, times) + f"  ratio p95 to seed distribution SQL "
                    f"{pct(times, 95) / pct(base_dist, 95):.1f}x"
                )
        print(
            f"worst endpoint p95: {worst:.1f} ms (target <= 50 ms):",
            "met" if worst <= 50 else "NOT met",
        )


if __name__ == "__main__":
    main()
