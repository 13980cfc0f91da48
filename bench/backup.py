"""Backup benchmark, on one fresh fleet (fsync on): a project with about
`--mb` MB of generated data among 20 small ones on the same server.

1. A full base backup of that server (pgBackRest), timed.
2. A snapshot through the API (pg_dump -Fc as the project's role, with the
   manifest read in the same snapshot, written aside, hashed, renamed):
   MB/s of database, and the ratio to a bare `pg_dump -Fc` of the same
   database with the same credentials, in the same run.
3. A point-in-time restore of that project into another region through the
   API, from the call to a verified, active project; and the same by hand
   (pgBackRest restore of the one database into a scratch directory, the
   instance started and recovered, pg_dump, pg_restore into an empty project
   in the other region), in the same run: the ratio.

    .venv/bin/python bench/backup.py [--mb 500]

Targets: both ratios <= 1.2; the restore under 2 minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.conninfo import make_conninfo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_fleet

from pgfleet.config import Settings
from pgfleet.fleet.binaries import find_binaries
from pgfleet.fleet.embedded import ADMIN_USER, EmbeddedFleet


def conn(c: dict[str, Any]) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=c["host"],
        port=c["port"],
        dbname=c["database"],
        user=c["user"],
        password=c["password"],
        sslmode="verify-full",
        sslrootcert=c["sslrootcert"],
        autocommit=True,
    )


def direct(http: httpx.Client, pid: str) -> dict[str, Any]:
    r = http.get(f"/v1/projects/{pid}/connection", params={"direct": "true"})
    r.raise_for_status()
    out: dict[str, Any] = r.json()
    return out


def create(http: httpx.Client, name: str, region: str) -> str:
    r = http.post("/v1/projects", json={"name": name, "region": region, "plan": "enterprise"})
    if r.status_code != 201:
        raise SystemExit(f"create {name} failed: {r.status_code} {r.text}")
    return str(r.json()["id"])


def tool(name: str, c: dict[str, Any], *args: str) -> None:
    dsn = make_conninfo(
        host=c["host"],
        port=c["port"],
        dbname=c["database"],
        user=c["user"],
        sslmode="verify-full",
        sslrootcert=c["sslrootcert"],
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = c["password"]
    subprocess.run([find_binaries().path(name), *args, f"--dbname={dsn}"], env=env, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=500, help="size of the big project's data")
    args = ap.parse_args()
    extra = {"PGFLEET_BACKUP_SCHEDULE": "false", "PGFLEET_OPERATION_WAIT_S": "900"}
    with bench_fleet(regions="us-east-1,eu-central-1", extra_env=extra) as bf:
        http = httpx.Client(
            base_url=bf.url, headers={"Authorization": f"Bearer {bf.token}"}, timeout=1800
        )
        for i in range(20):
            pid = create(http, f"small-{i}", "us-east-1")
            with conn(direct(http, pid)) as c:
                c.execute(
                    "CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 2000) g"
                )
        big = create(http, "big", "us-east-1")
        bc = direct(http, big)
        t0 = time.perf_counter()
        with conn(bc) as c:
            c.execute("SET statement_timeout = 0")
            c.execute(
                "CREATE TABLE events (id bigint PRIMARY KEY, account int, kind text, "
                "payload text, at timestamptz)"
            )
            n = 0
            while True:
                size = c.execute("SELECT pg_database_size(current_database())").fetchone()
                assert size is not None
                if size[0] >= args.mb * 1024 * 1024:
                    break
                c.execute(
                    "INSERT INTO events SELECT g, g %% 1000, 'kind-' || (g %% 7), "
                    "md5(g::text) || md5((g * 7)::text), now() - (g || ' s')::interval "
                    "FROM generate_series(%s, %s) g",
                    (n + 1, n + 500_000),
                )
                n += 500_000
            db_bytes = int(size[0])
        mb = db_bytes / 1024 / 1024
        print(
            f"data: {n:,} rows, {mb:.0f} MB database, generated in {time.perf_counter() - t0:.0f} s"
        )

        settings = Settings(home=bf.home, port_base=int(bf.env["PGFLEET_PORT_BASE"]))
        fleet = EmbeddedFleet(settings)
        server = next(s for s in fleet.regional_servers() if s.region == "us-east-1")

        # 1. base backup
        t = time.perf_counter()
        r = http.post("/v1/admin/base-backups", json={"server": server.name, "type": "full"})
        r.raise_for_status()
        base_s = time.perf_counter() - t
        bb = r.json()
        print(
            f"base backup (full, {bb['size_bytes'] / 1e6:.0f} MB of data -> "
            f"{bb['repo_bytes'] / 1e6:.0f} MB stored): {base_s:.1f} s"
        )

        # 2. snapshot vs bare pg_dump, alternating
        snap_s, bare_s = [], []
        work = Path(tempfile.mkdtemp(prefix="pgfleet-bench-dump-"))
        for _ in range(2):
            t = time.perf_counter()
            tool("pg_dump", bc, "--format=custom", "--no-password", f"--file={work / 'bare.dump'}")
            bare_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = http.post(f"/v1/projects/{big}/backups")
            r.raise_for_status()
            snap_s.append(time.perf_counter() - t)
        s_best, b_best = min(snap_s), min(bare_s)
        print(
            f"snapshot via API: {s_best:.1f} s = {mb / s_best:.1f} MB/s; bare pg_dump -Fc: "
            f"{b_best:.1f} s = {mb / b_best:.1f} MB/s; ratio {s_best / b_best:.2f} (target <= 1.2)"
        )

        # 3. point-in-time restore into eu-central-1, vs by hand
        with conn(bc) as c:
            c.execute("UPDATE events SET kind = 'late' WHERE id <= 1000")
            target = c.execute("SELECT now()").fetchone()
            assert target is not None
            c.execute("DELETE FROM events WHERE id <= 5000")  # after the target
        when: datetime = target[0]
        time.sleep(1.1)
        t = time.perf_counter()
        r = http.post(
            f"/v1/projects/{big}/restore",
            json={"target_time": when.isoformat(), "region": "eu-central-1"},
        )
        if r.status_code != 201:
            raise SystemExit(f"the restore failed: {r.status_code} {r.text}")
        api_restore_s = time.perf_counter() - t
        restored = r.json()
        steps = {s["name"]: s["duration_ms"] for s in restored["operation"]["steps"]}
        print(
            f"point-in-time restore via API (to a verified project in eu-central-1): "
            f"{api_restore_s:.1f} s (target < 120 s); steps: "
            + ", ".join(f"{k} {v / 1000:.1f} s" for k, v in steps.items() if v and v > 100)
        )
        with conn(direct(http, restored["id"])) as c:
            got = c.execute("SELECT count(*), count(*) FILTER (WHERE kind = 'late') FROM events")
            print(f"restored rows: {got.fetchone()} (expected ({n:,}, 1000))")

        # by hand: the same pgBackRest restore, instance, pg_dump, pg_restore
        empty = create(http, "by-hand", "eu-central-1")
        ec = direct(http, empty)
        archive = fleet.archive
        assert archive is not None
        stanza = archive.stanza(server.name)
        t = time.perf_counter()
        scratch = fleet.scratch("bench-by-hand")
        archive.restore(stanza, scratch.data_dir, target_time=when, include=bc["database"])
        scratch.start()
        with scratch.connect("postgres", ADMIN_USER):
            pass
        dump = scratch.data_dir.parent / "hand.dump"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        subprocess.run(
            [
                find_binaries().path("pg_dump"),
                "--format=custom",
                f"--file={dump}",
                f"--dbname={make_conninfo(**scratch.conninfo(bc['database'], bc['user']))}",
            ],
            env=env,
            check=True,
        )
        scratch.stop()
        tool(
            "pg_restore",
            ec,
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "--single-transaction",
            "--no-password",
            str(dump),
        )
        hand_s = time.perf_counter() - t
        scratch.remove()
        print(
            f"the same by hand (pgbackrest restore + recovery + pg_dump + pg_restore): "
            f"{hand_s:.1f} s; ratio {api_restore_s / hand_s:.2f} (target <= 1.2)"
        )
        shutil.rmtree(work, ignore_errors=True)
        print(f"finished at {datetime.now(UTC):%Y-%m-%d %H:%M:%S}Z")


if __name__ == "__main__":
    main()
