"""Login benchmark: what the SCRAM iteration count costs a connection.

Creates one project through the API (embedded fleet, TLS as `pgfleet up`
runs it), then logs in to its server directly (not through a router) as
its rw role again and again (connect, close),
alternating blocks with the role's verifier as pgfleet makes it
(crypto.MACHINE_SCRAM_ITERATIONS) and as PostgreSQL's default would
(4,096 iterations, libpq's encrypt_password), same password, same run.
Also prints the client's own key derivation (PBKDF2) at both counts.

Then what a login costs the server itself, over its Unix socket (the SQL
API's way in when it has no warm connection for a project, as in a
round-robin over more projects than it keeps pools for): the server's CPU
per connect+close, per connect+`select 1`+`DISCARD ALL`+close (the SQL
API's reset), and per `select 1` on a warm connection (the baseline), read
from /proc for the server's postmaster and all its backends.

    .venv/bin/python bench/login.py [--n 300]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_fleet, connect_with, elapsed_ms, fleet_cpu, pct, summary

from pgfleet.config import Settings
from pgfleet.crypto import MACHINE_SCRAM_ITERATIONS, PERSON_SCRAM_ITERATIONS, scram_sha256_verifier
from pgfleet.fleet.embedded import EmbeddedFleet

REGION = "us-east-1"
BLOCK = 25


def login_ms(c: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    connect_with(c).close()
    return elapsed_ms(t0)


def server_costs(home: Path, server: str, local: dict[str, Any], n: int) -> dict[str, float]:
    """The server's CPU (ms) per each way of using a connection."""

    def connect_close() -> None:
        psycopg.connect(**local).close()

    def cold_request() -> None:
        with psycopg.connect(**local) as conn:
            conn.execute("select 1").fetchone()
            conn.execute("DISCARD ALL")

    out: dict[str, float] = {}
    with psycopg.connect(**local) as warm_conn:

        def warm() -> None:
            warm_conn.execute("select 1").fetchone()

        for label, fn in (
            ("connect, close", connect_close),
            ("connect, select 1, DISCARD ALL, close", cold_request),
            ("select 1 on a warm connection", warm),
        ):
            for _ in range(10):
                fn()
            # A warm query costs the server tens of microseconds: n of them
            # would read 0 on /proc's clock tick (10 ms), so it runs 100 times
            # as often.
            times = n * 100 if fn is warm else n
            before = fleet_cpu(home)[f"server {server}"]
            for _ in range(times):
                fn()
            time.sleep(0.2)  # the last backends exit and are reaped
            out[label] = (fleet_cpu(home)[f"server {server}"] - before) * 1000 / times
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="logins per verifier (default 300)")
    args = ap.parse_args()
    with bench_fleet(regions=REGION) as bf:
        headers = {"Authorization": f"Bearer {bf.token}"}
        with httpx.Client(base_url=bf.url, headers=headers, timeout=60) as http:
            r = http.post("/v1/projects", json={"name": "login", "region": REGION})
            r.raise_for_status()
            # Direct to the server: through a router, the login is checked
            # against the router's copy of the verifier, which an ALTER ROLE
            # on the server does not change.
            r = http.get(f"/v1/projects/{r.json()['id']}/connection", params={"direct": "true"})
            r.raise_for_status()
            c = r.json()
        fleet = EmbeddedFleet(Settings(home=bf.home, embedded_regions=[REGION]))
        srv = next(s for s in fleet.regional_servers() if s.region == REGION)
        with psycopg.connect(**fleet.conninfo(srv), autocommit=True) as admin:
            libpq = admin.pgconn.encrypt_password(
                c["password"].encode(), c["user"].encode(), b"scram-sha-256"
            ).decode()
            verifiers = {
                f"{MACHINE_SCRAM_ITERATIONS} iterations (pgfleet's)": scram_sha256_verifier(
                    c["password"], MACHINE_SCRAM_ITERATIONS
                ),
                f"{PERSON_SCRAM_ITERATIONS} iterations (PostgreSQL's)": libpq,
            }
            times: dict[str, list[float]] = {k: [] for k in verifiers}
            for _ in range(3):
                login_ms(c)  # warm-up
            while min(len(v) for v in times.values()) < args.n:
                for label, verifier in verifiers.items():
                    admin.execute(
                        sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                            sql.Identifier(c["user"]), sql.Literal(verifier)
                        )
                    )
                    times[label] += [login_ms(c) for _ in range(BLOCK)]
        local = {
            **{k: c[k] for k in ("user", "password")},
            "port": srv.port,
            "dbname": c["database"],
            "host": str(fleet.socket_dir(srv.name)),
            "autocommit": True,
        }
        costs = server_costs(bf.home, srv.name, local, args.n)
    print(f"embedded fleet, loopback TLS; {args.n} logins each, alternating blocks of {BLOCK}")
    for label, ms in times.items():
        print(summary(f"login, verifier at {label}", ms))
    fast, slow = (pct(ms, 50) for ms in times.values())
    saved = slow - fast
    print(
        f"ratio p50 4,096 / {MACHINE_SCRAM_ITERATIONS}: {slow / fast:.2f}x ({saved:.2f} ms saved)"
    )
    print(f"the server's CPU over its Unix socket ({args.n} each; SCRAM at pgfleet's count)")
    for label, ms in costs.items():
        print(f"  {label:<44} {ms:7.3f} ms")
    warm = costs["select 1 on a warm connection"]
    cold = costs["connect, select 1, DISCARD ALL, close"]
    print(f"ratio cold / warm request, server CPU: {cold / warm:.0f}x")
    salt = os.urandom(16)
    for n in (MACHINE_SCRAM_ITERATIONS, PERSON_SCRAM_ITERATIONS):
        t0 = time.perf_counter()
        for _ in range(50):
            hashlib.pbkdf2_hmac("sha256", b"x" * 32, salt, n)
        print(f"PBKDF2-HMAC-SHA256 at {n:>4} iterations: {elapsed_ms(t0) / 50:.3f} ms (one side)")


if __name__ == "__main__":
    main()
