"""Shared helpers for the benchmarks: a throwaway embedded fleet with the API
in a real uvicorn process, and percentile arithmetic."""

from __future__ import annotations

import json
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
    # Below the kernel's ephemeral range (see tests/helpers.free_port_block).
    for base in range(21000, 32700 - n, 53):
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
        # What a bench measures is the fleet, not the rate limiter: reading
        # 50 operations back one after another runs past its default 100
        # requests a second (bench/provision.py did, once they got faster).
        PGFLEET_RATE_LIMIT_PER_S="1000000",
        PGFLEET_RATE_LIMIT_SQL_PER_S="1000000",
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


# ---- where the CPU goes ------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, own CPU seconds, reaped children's CPU seconds)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, (utime + stime) / _TICK, (cutime + cstime) / _TICK


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def fleet_cpu(home: Path) -> dict[str, float]:
    """CPU seconds used so far by the fleet in `home`, by part: each server
    (its postmaster and every backend, exited ones included), the routers,
    the API processes (and their workers). Read before and after a phase;
    the difference is what the phase cost each part."""
    stats: dict[int, tuple[int, float, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                stats[int(entry.name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)

    def tree(pid: int) -> float:
        # A live process's own time, plus what its reaped children used,
        # plus its live children's trees.
        _, own, reaped = stats[pid]
        return own + reaped + sum(tree(c) for c in children.get(pid, []))

    out: dict[str, float] = {}
    home_s = str(home)
    try:  # the API (`up --detach`): its pid file; workers are its children
        api = int(json.loads((home / "api.pid").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        api = None
    if api in stats:
        out["API processes"] = tree(api)
    for pid in stats:
        cmd = _cmdline(pid)
        if home_s not in cmd or pid == api:
            continue
        parent = stats[pid][0]
        if home_s in _cmdline(parent):
            continue  # counted with its parent's tree
        if "/servers/" in cmd and " -D " in f" {cmd}":
            name = cmd.split("/servers/", 1)[1].split("/", 1)[0]
            part = "platform DB" if name == "platform" else f"server {name}"
        elif "pgbouncer" in cmd:
            part = "routers"
        else:
            part = "other fleet processes"
        out[part] = out.get(part, 0.0) + tree(pid)
    return out


def cpu_report(before: dict[str, float], after: dict[str, float], per: int, what: str) -> str:
    """What each part used between two fleet_cpu readings, per `what`."""
    lines = [f"CPU per {what} (ms), by process, over {per}:"]
    total = 0.0
    for part in sorted(after):
        used = (after[part] - before.get(part, 0.0)) * 1000 / per
        total += used
        lines.append(f"  {part:<28} {used:8.1f}")
    lines.append(f"  {'fleet in all':<28} {total:8.1f}")
    return "\n".join(lines)


def spares_ready(home: Path, regions: Sequence[str]) -> dict[str, int]:
    """Prepared spares a create may take now (made, and known to every
    router), per region, as the platform DB records them."""
    from pgfleet.config import Settings
    from pgfleet.fleet.embedded import EmbeddedFleet

    fleet = EmbeddedFleet(Settings(home=home, embedded_regions=list(regions)))
    with psycopg.connect(**fleet.platform_conninfo(), autocommit=True) as conn:
        got = dict(
            conn.execute(
                "SELECT v.region, count(s.id) FROM servers v LEFT JOIN spares s "
                "ON s.server_id = v.id AND s.state = 'ready' GROUP BY v.region"
            ).fetchall()
        )
    return {r: int(got.get(r, 0)) for r in regions}


def wait_for_spares(home: Path, regions: Sequence[str], count: int, timeout: float = 300) -> None:
    """Until every region's server has `count` spares a create may take."""
    end = time.monotonic() + timeout
    while min(spares_ready(home, regions).values()) < count and time.monotonic() < end:
        time.sleep(0.5)
