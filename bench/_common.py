"""Shared helpers for the benchmarks: a throwaway embedded fleet with the API
in a real uvicorn process, and percentile arithmetic."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(label: str, ms: Sequence[float]) -> str:
    return (
        f"{label:<42} n={len(ms):<5} p50={pct(ms, 50):7.2f} ms  p95={pct(ms, 95):7.2f} ms  "
        f"p99={pct(ms, 99):7.2f} ms  mean={statistics.fmean(ms):7.2f} ms"
    )


def _free_base(n: int) -> int:
    for base in range(46000, 60000, 53):
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


@dataclass
class BenchFleet:
    home: Path
    env: dict[str, str]
    url: str
    token: str


@contextmanager
def bench_fleet(
    *,
    fsync: bool = True,
    regions: str = "us-east-1,eu-central-1,ap-southeast-1",
    extra_env: dict[str, str] | None = None,
) -> Iterator[BenchFleet]:
    home = Path(tempfile.mkdtemp(prefix="pgfleet-bench-"))
    os.chmod(home, 0o755)
    base = _free_base(60)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PGFLEET_", "POSTGRES_HOST_", "PG"))
    }
    env.update(
        PGFLEET_HOME=str(home),
        PGFLEET_PORT_BASE=str(base),
        PGFLEET_API_PORT=str(base + 55),
        PGFLEET_FSYNC=str(fsync).lower(),
        PGFLEET_EMBEDDED_REGIONS=regions,
        **(extra_env or {}),
    )
    cli = [sys.executable, "-m", "pgfleet.cli"]
    try:
        up = subprocess.run(
            [*cli, "up", "--detach"], env=env, capture_output=True, text=True, timeout=300
        )
        if up.returncode != 0:
            raise SystemExit(f"pgfleet up failed:\n{up.stdout}\n{up.stderr}")
        token = (home / "admin-token").read_text().strip()
        url = f"http://127.0.0.1:{base + 55}"
        httpx.get(f"{url}/health", timeout=10).raise_for_status()
        yield BenchFleet(home, env, url, token)
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=300)
        shutil.rmtree(home, ignore_errors=True)


def elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def connect_with(c: dict[str, Any]) -> psycopg.Connection[Any]:
    """A session with the credentials an API answer handed out (TLS verified)."""
    return psycopg.connect(
        host=c["host"],
        port=c["port"],
        dbname=c["database"],
        user=c["user"],
        password=c["password"],
        sslmode=c["sslmode"],
        sslrootcert=c.get("sslrootcert"),
    )
