"""Several API processes (`PGFLEET_API_WORKERS`): `pgfleet serve` as a real
subprocess on the suite's fleet."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo

from pgfleet.auth import create_owner
from pgfleet.platform.core import Platform
from tests.helpers import FleetUnderTest, children_of, until, wait_healthy


@dataclass
class Served:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture
def two_workers(
    platform: Platform, fleet: FleetUnderTest, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Served]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = fleet.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGFLEET_", "PROMETHEUS_"))}
    env.update(
        PGFLEET_HOME=str(s.home_abs),
        PGFLEET_PORT_BASE=str(s.port_base),
        PGFLEET_FSYNC="false",
        PGFLEET_BACKUP_SCHEDULE="false",
        PGFLEET_EMBEDDED_REGIONS=",".join(s.embedded_regions),
        PGFLEET_PLATFORM_DSN=make_conninfo(**platform.conninfo),
        PGFLEET_API_PORT=str(port),
        PGFLEET_API_WORKERS="2",
    )
    env.update(getattr(request, "param", {}))  # a test's own settings
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgfleet.cli", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 60, lambda: None if proc.poll() is None else log.read_text())
        yield Served(url, port, proc, log)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a test may have ended it
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def api_processes(parent: int) -> list[int]:
    """The API processes under `pgfleet serve`'s process (not
    multiprocessing's resource tracker, also a child)."""
    found = []
    for pid in children_of(parent):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


def established_on(port: int, pids: list[int], state: str = "01") -> dict[int, int]:
    """How many established connections to `port` each process holds (with
    state "0A": how many sockets listening on it)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == state:
                    inodes.add(f[9])
    held = {}
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        n = 0
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes:
                    n += 1
        held[pid] = n
    return held


def _sql_requests(url: str, token: str) -> float:
    r = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    for fam in text_string_to_metric_families(r.text):
        if fam.name == "pgfleet_http_requests":
            return sum(
                s.value
                for s in fam.samples
                if s.name == "pgfleet_http_requests_total"
                and s.labels["route"] == "/v1/projects/{project_id}/sql"
                and s.labels["status"] == "200"
            )
    raise AssertionError("no pgfleet_http_requests in /metrics")


def test_metrics_count_every_process(two_workers: Served, platform: Platform) -> None:
    """Each request on its own connection lands on either process; every
    scrape, whichever process answers, counts them all."""
    url = two_workers.url
    _, token = create_owner(platform, "admin", is_admin=True)
    headers: dict[str, Any] = {"Authorization": f"Bearer {token}"}
    r = httpx.post(f"{url}/v1/projects", json={"name": "mp"}, headers=headers, timeout=60)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    n = 30
    for _ in range(n):
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            r = http.post(f"/v1/projects/{pid}/sql", json={"query": "select 1"})
            assert r.status_code == 200, r.text
    for _ in range(6):
        assert _sql_requests(url, token) == n


def test_a_burst_of_connections_spreads_over_the_processes(two_workers: Served) -> None:
    """32 connections opened at once (as a client's keep-alive pool does):
    both API processes take some. On one socket shared by both, whichever
    woke first accepted the whole burst."""
    processes = api_processes(two_workers.proc.pid)
    assert len(processes) == 2, processes
    # Each listens once its app has started (until then the kernel sends it
    # nothing); /health answered by one says nothing of the other.
    assert until(lambda: min(established_on(two_workers.port, processes, "0A").values()), 30)
    burst = []
    try:
        for _ in range(32):
            burst.append(socket.create_connection(("127.0.0.1", two_workers.port), timeout=10))
        assert until(lambda: sum(established_on(two_workers.port, processes).values()) == 32, 10)
        held = established_on(two_workers.port, processes)
        assert min(held.values()) >= 4, held
    finally:
        for sock in burst:
            sock.close()


def test_a_process_that_dies_is_replaced_and_sigterm_stops_them_all(two_workers: Served) -> None:
    first = api_processes(two_workers.proc.pid)
    assert len(first) == 2, first
    os.kill(first[0], signal.SIGKILL)
    assert until(lambda: len(set(api_processes(two_workers.proc.pid)) - {first[0]}) == 2, 30)
    # Its replacement dies young too: the next waits (no busy restart loop).
    (young,) = set(api_processes(two_workers.proc.pid)) - set(first)
    os.kill(young, signal.SIGKILL)
    assert until(lambda: "another starts in 1 s" in two_workers.log.read_text(), 10)
    assert until(lambda: len(set(api_processes(two_workers.proc.pid)) - {young}) == 2, 30)
    wait_healthy(two_workers.url, 30, lambda: None)
    now = api_processes(two_workers.proc.pid)
    for _ in range(10):  # whichever process answers
        assert httpx.get(f"{two_workers.url}/health", timeout=10).status_code == 200
    os.kill(two_workers.proc.pid, signal.SIGTERM)  # what `pgfleet down` sends
    assert two_workers.proc.wait(timeout=20) == 0
    assert not [p for p in now if Path(f"/proc/{p}").exists()], "an API process outlived its parent"


def test_an_orphaned_process_ends(two_workers: Served) -> None:
    """If the parent is killed outright, its API processes end too: an orphan
    would keep the port, and a new API there would find it taken."""
    processes = api_processes(two_workers.proc.pid)
    os.kill(two_workers.proc.pid, signal.SIGKILL)
    two_workers.proc.wait(timeout=10)
    assert until(lambda: not [p for p in processes if Path(f"/proc/{p}").exists()], 20)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", two_workers.port))  # the port is free again


def stopped_and_replaced(
    served: Served, stopped: int, other: int, within: float, said: str
) -> None:
    """SIGSTOP `stopped`: it is killed within `within` seconds (the log
    says `said`), another takes its place beside `other`, and every new
    connection is answered, whichever process the kernel picks."""
    os.kill(stopped, signal.SIGSTOP)
    try:
        assert until(lambda: not Path(f"/proc/{stopped}").exists(), within)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGCONT)
    assert said in served.log.read_text()
    assert until(lambda: len(api_processes(served.proc.pid)) == 2, 30)
    now = api_processes(served.proc.pid)
    assert other in now and stopped not in now, now
    assert until(lambda: min(established_on(served.port, now, "0A").values()), 30)
    for _ in range(20):
        with httpx.Client(timeout=5) as http:
            assert http.get(f"{served.url}/health").status_code == 200


@pytest.mark.parametrize("two_workers", [{"PGFLEET_API_STALL_TIMEOUT_S": "3"}], indirect=True)
def test_a_process_that_stops_running_is_replaced(two_workers: Served) -> None:
    """A process stopped with SIGSTOP is alive to the kernel, which goes on
    sending it its share of new connections; they would hang. The parent
    sees its event loop no longer beats, kills it and starts another."""
    processes = api_processes(two_workers.proc.pid)
    assert len(processes) == 2, processes
    assert until(lambda: min(established_on(two_workers.port, processes, "0A").values()), 30)
    stopped_and_replaced(two_workers, processes[0], processes[1], 20, "has not run for")


@pytest.mark.parametrize("two_workers", [{"PGFLEET_API_STALL_TIMEOUT_S": "3"}], indirect=True)
def test_a_process_stopped_before_it_served_is_replaced(two_workers: Served) -> None:
    """One stopped while its app starts never beats: it is given the start's
    allowance (2 x 3 + 10 s here), then killed and replaced as well. (It
    takes no connections before it listens, but the API ran one short.)"""
    from pgfleet.api.processes import start_timeout

    first = api_processes(two_workers.proc.pid)
    assert len(first) == 2, first
    os.kill(first[0], signal.SIGKILL)
    fresh: list[int] = []

    def replaced() -> bool:
        fresh[:] = [p for p in api_processes(two_workers.proc.pid) if p not in first]
        return bool(fresh)

    assert until(replaced, 10)  # polled every 10 ms
    # Stopped long before its app has started.
    stopped_and_replaced(
        two_workers, fresh[0], first[1], start_timeout(3) + 10, "has not started serving in"
    )
