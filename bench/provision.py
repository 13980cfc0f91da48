"""Provisioning benchmark.

Creates N projects through the REST API (real uvicorn process, embedded fleet
with fsync on, as `pgfleet up` runs it) with some concurrency, and measures
each from the request to credentials that connect (`select 1` as the new
role). Every create goes through the operations path: the API records the
provision operation, a worker runs it, the API waits for it (wait=true).
Baseline in the same run, on the same server: a bare
CREATE ROLE + CREATE DATABASE + REVOKE over a warm admin connection.

The measured creates find prepared spares ready (the API's worker makes
n + n1 + 20 of them first, as it would keep them between bursts, and
the burst starts once the pool is full again); `--no-spares`
measures the slow path (every create makes its roles and database). Then, on a
second fleet without spares, the queue latency (operation created -> a
worker started it, from the operations' own timestamps) and the whole
operation with 1, 2 and 4 worker processes (`pgfleet worker --concurrency 1`
each) in place of the API's embedded one.

    .venv/bin/python bench/provision.py [--n 200] [--concurrency 4] [--queue-n 60]

It also times `--n1` creates one at a time (concurrency 1): the latency a
single caller sees on an otherwise idle machine. At concurrency 4 the p50
is bound by the throughput (Little's law: p50 ~ 4 / rate), so on two cores
it shows how much work a create costs rather than how long one waits.

Targets (issue 13, 2-core machine): at concurrency 4 p50 <= 50 ms, p99 <=
150 ms, >= 40 projects/s; the claim (`roles` step) p50 <= 10 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BenchFleet,
    bench_fleet,
    connect_with,
    cpu_report,
    elapsed_ms,
    fleet_cpu,
    pct,
    summary,
    wait_for_spares,
)

from pgfleet.config import Settings
from pgfleet.fleet.embedded import EmbeddedFleet
from pgfleet.tenants.spares import ready_count

REGION = "us-east-1"


def baseline(bf: BenchFleet, n: int) -> list[float]:
    fleet = EmbeddedFleet(Settings(home=bf.home, embedded_regions=[REGION]))
    srv = next(s for s in fleet.regional_servers() if s.region == REGION)
    times: list[float] = []
    names: list[str] = []
    with psycopg.connect(**fleet.conninfo(srv), autocommit=True) as conn:
        for _ in range(n):
            name = "bench_" + uuid.uuid4().hex
            names.append(name)
            ident = sql.Identifier(name)
            t0 = time.perf_counter()
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'x'").format(ident))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(ident, ident))
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
            times.append(elapsed_ms(t0))
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
    return times


def provision_one(http: httpx.Client, i: int) -> float:
    return provision_timed(http, i)[0]


def provision_timed(http: httpx.Client, i: int) -> tuple[float, float, str]:
    """(request -> credentials that connect, request -> 201, operation id)."""
    t0 = time.perf_counter()
    r = http.post("/v1/projects", json={"name": f"bench {i}", "region": REGION, "plan": "free"})
    r.raise_for_status()
    answered = elapsed_ms(t0)
    c = r.json()["connection"]
    with connect_with(c) as conn:
        conn.execute("select 1")
    return elapsed_ms(t0), answered, str(r.json()["operation"]["id"])


def spares_ready(bf: BenchFleet) -> int:
    fleet = EmbeddedFleet(Settings(home=bf.home, embedded_regions=[REGION]))
    srv = next(s for s in fleet.regional_servers() if s.region == REGION)
    with psycopg.connect(**fleet.conninfo(srv), autocommit=True) as conn:
        return ready_count(conn)


def operation(http: httpx.Client, op_id: str) -> dict[str, Any]:
    r = http.get(f"/v1/operations/{op_id}")
    if r.status_code != 200:
        raise SystemExit(f"GET /v1/operations/{op_id}: {r.status_code} {r.text}")
    body: dict[str, Any] = r.json()
    return body


def _ts(v: str) -> datetime:
    return datetime.fromisoformat(v)


def queue_latency(bf: BenchFleet, http: httpx.Client, workers: int, n: int, c: int) -> None:
    """Creates n projects (wait=true) with `workers` worker processes running
    the operations; prints the p50/p99 of created -> started."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pgfleet", "worker", "--concurrency", "1"],
            env=bf.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(workers)
    ]
    try:
        time.sleep(2.5)  # imports and worker registration
        t0 = time.perf_counter()
        with ThreadPoolExecutor(c) as ex:
            ids = list(ex.map(lambda i: provision_op(http, i), range(n)))
        wall = time.perf_counter() - t0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    waits, totals = [], []
    for op_id in ids:
        op = http.get(f"/v1/operations/{op_id}").json()
        waits.append((_ts(op["started_at"]) - _ts(op["created_at"])).total_seconds() * 1000)
        totals.append((_ts(op["finished_at"]) - _ts(op["created_at"])).total_seconds() * 1000)
    print(summary(f"queue latency, {workers} worker(s), c={c}", waits))
    print(summary("  operation created -> finished", totals) + f"  ({n / wall:.1f}/s)")


def provision_op(http: httpx.Client, i: int) -> str:
    r = http.post("/v1/projects", json={"name": f"q {i}", "region": REGION, "plan": "free"})
    r.raise_for_status()
    return str(r.json()["operation"]["id"])


def start_profile(bf: BenchFleet, out: str) -> subprocess.Popen[bytes]:
    """py-spy recording the API process and its children (the embedded worker)."""
    spy = shutil.which("py-spy")
    if spy is None:
        sys.exit("--profile needs py-spy on PATH (pip install py-spy)")
    api = json.loads((bf.home / "api.pid").read_text())["pid"]
    proc = subprocess.Popen(
        [spy, "record", "--subprocesses", "--rate", "250", "--gil", "-p", str(api), "-o", out]
        + ([] if out.endswith(".svg") else ["--format", "raw"]),
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached before the phase starts
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="projects to create (default 200)")
    ap.add_argument("--concurrency", type=int, default=4, help="parallel clients (default 4)")
    ap.add_argument(
        "--queue-n", type=int, default=40, help="projects per queue-latency run (default 40)"
    )
    ap.add_argument("--n1", type=int, default=50, help="creates one at a time (default 50)")
    ap.add_argument("--no-spares", action="store_true", help="measure the slow path")
    ap.add_argument("--no-queue", action="store_true", help="skip the queue-latency runs")
    ap.add_argument(
        "--profile",
        metavar="FILE",
        help="record the API processes with py-spy (on PATH) during the c>1 phase: "
        "a flame graph if FILE ends in .svg, else collapsed stacks",
    )
    args = ap.parse_args()
    spares = 0 if args.no_spares else args.n + args.n1 + 20
    with bench_fleet(regions=REGION, extra_env={"PGFLEET_SPARE_DATABASES": str(spares)}) as bf:
        print(f"embedded fleet in {bf.home} (fsync on); API {bf.url}")
        t_fill = time.perf_counter()
        wait_for_spares(bf.home, [REGION], spares)
        took = time.perf_counter() - t_fill
        print(f"{spares} prepared spares made by the worker in {took:.1f} s")
        base = baseline(bf, min(args.n, 100))
        headers = {"Authorization": f"Bearer {bf.token}"}
        with httpx.Client(base_url=bf.url, headers=headers, timeout=60) as http:
            for i in range(5):  # warm-up: pools, imports
                provision_one(http, -i)
            timed1 = [provision_timed(http, -10 - i) for i in range(args.n1)]
            alone = [t for t, _, _ in timed1]
            ops1 = [operation(http, op_id) for _, _, op_id in timed1]
            # The burst arrives at a full pool, as between bursts (the creates
            # above took some): else it ran under the refill's reserve for its
            # last quarter, and the refill made spares in the middle of it.
            wait_for_spares(bf.home, [REGION], spares)
            ready0 = spares_ready(bf)
            spy = start_profile(bf, args.profile) if args.profile else None
            cpu0, own0 = fleet_cpu(bf.home), os.times()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as ex:
                timed = list(ex.map(lambda i: provision_timed(http, i), range(args.n)))
            wall = time.perf_counter() - t0
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                spy.wait(timeout=60)
            cpu1, own1 = fleet_cpu(bf.home), os.times()
            # Spares the worker made meanwhile (each create claimed one).
            refilled = spares_ready(bf) - ready0 + args.n
            times = [t for t, _, _ in timed]
            ops = [operation(http, op_id) for _, _, op_id in timed[-100:]]
            answers = [a for _, a, _ in timed[-100:]]
    print(summary("baseline: CREATE ROLE+DATABASE+REVOKE", base))
    print(summary("API create -> connect (c=1)", alone))
    for name in ("roles", "activate"):
        one = [
            st["duration_ms"]
            for op in ops1
            for st in op["steps"]
            if st["name"] == name and st["duration_ms"] is not None
        ]
        print(summary(f"  step {name} (c=1)", one))
    print(summary(f"API create -> connect (c={args.concurrency})", times))
    steps: dict[str, list[float]] = {}
    for op in ops:
        for st in op["steps"]:
            if st["duration_ms"] is not None:
                steps.setdefault(st["name"], []).append(st["duration_ms"])
    for name, ms in steps.items():
        print(summary(f"  step {name}", ms))
    # Where the rest goes: before the first step, after the last, and the
    # request around the operation (HTTP, auth, the create transaction, the
    # answer), from the operations' own timestamps.
    created = [_ts(op["created_at"]) for op in ops]
    started = [_ts(op["started_at"]) for op in ops]
    finished = [_ts(op["finished_at"]) for op in ops]
    op_ms = [(f - c).total_seconds() * 1000 for c, f in zip(created, finished, strict=True)]
    print(
        summary(
            "  operation created -> started",
            [(s - c).total_seconds() * 1000 for c, s in zip(created, started, strict=True)],
        )
    )
    print(summary("  operation created -> finished", op_ms))
    print(
        summary(
            "  request -> 201, less the operation",
            [a - o for a, o in zip(answers, op_ms, strict=True)],
        )
    )
    print(summary("  201 -> credentials connect", [t - a for t, a, _ in timed]))
    rate = args.n / wall
    print(cpu_report(cpu0, cpu1, args.n, f"create at c={args.concurrency}"))
    own = (own1.user + own1.system - own0.user - own0.system) * 1000 / args.n
    print(f"  {'this benchmark (the clients)':<28} {own:8.1f}")
    print(f"  machine: {os.cpu_count()} cores, {wall:.1f} s wall")
    print(f"  spares the worker made meanwhile: {refilled} (their cost is in the figures above)")
    ratio = pct(times, 50) / pct(base, 50)
    print(f"throughput: {rate:.1f} projects/s over {wall:.1f} s")
    print(f"ratio p50 API / baseline: {ratio:.2f}x")
    claim = pct(steps.get("roles", [float("inf")]), 50)
    claim1 = pct(
        [st["duration_ms"] for op in ops1 for st in op["steps"] if st["name"] == "roles"], 50
    )
    for label, met in (
        (f"p50 <= 50 ms at c={args.concurrency}", pct(times, 50) <= 50),
        (f"p99 <= 150 ms at c={args.concurrency}", pct(times, 99) <= 150),
        (">= 40 projects/s", rate >= 40),
        (f"claim p50 <= 10 ms at c={args.concurrency}", claim <= 10),
        ("claim p50 <= 10 ms at c=1", claim1 <= 10),
        ("p50 <= 50 ms at c=1", pct(alone, 50) <= 50),
    ):
        print(f"target {label}:", "met" if met else "NOT met")

    if args.no_queue:
        return
    # Queue latency: the API runs no worker; 1, 2, 4 worker processes do.
    # No spare databases here: every operation creates its database.
    with bench_fleet(
        extra_env={"PGFLEET_EMBEDDED_WORKERS": "0", "PGFLEET_SPARE_DATABASES": "0"}
    ) as bf:
        headers = {"Authorization": f"Bearer {bf.token}"}
        with httpx.Client(base_url=bf.url, headers=headers, timeout=120) as http:
            for workers in (1, 2, 4):
                # c=1: the dispatch latency alone; c=4: with requests waiting
                # for a free worker.
                for c in (1, args.concurrency):
                    queue_latency(bf, http, workers, args.queue_n, c)


if __name__ == "__main__":
    main()
