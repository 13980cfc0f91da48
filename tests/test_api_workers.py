"""Several API processes (`PGFLEET_API_WORKERS`): `pgfleet serve` as a real
subprocess on the suite's fleet."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo

from pgfleet.auth import create_owner
from pgfleet.platform.core import Platform
from tests.helpers import FleetUnderTest, wait_healthy


@pytest.fixture
def two_workers(platform: Platform, fleet: FleetUnderTest, tmp_path: Path) -> Iterator[str]:
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
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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


def test_metrics_count_every_process(two_workers: str, platform: Platform) -> None:
    """Each request on its own connection lands on either process; every
    scrape, whichever process answers, counts them all."""
    _, token = create_owner(platform, "admin", is_admin=True)
    headers: dict[str, Any] = {"Authorization": f"Bearer {token}"}
    r = httpx.post(f"{two_workers}/v1/projects", json={"name": "mp"}, headers=headers, timeout=60)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    n = 30
    for _ in range(n):
        with httpx.Client(base_url=two_workers, headers=headers, timeout=30) as http:
            r = http.post(f"/v1/projects/{pid}/sql", json={"query": "select 1"})
            assert r.status_code == 200, r.text
    for _ in range(6):
        assert _sql_requests(two_workers, token) == n
