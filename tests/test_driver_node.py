"""The real Neon serverless driver (`@neondatabase/serverless`, pinned in
tests/driver/package.json: 1.2.0) against POST /sql on a live API, with
node-postgres over TCP as the reference for every value (tests/driver/
check.mjs). scripts/bootstrap.sh installs Node.js and the packages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.helpers import Api, create_ok

DRIVER_DIR = Path(__file__).parent / "driver"


def _node() -> str:
    node = shutil.which("node") or shutil.which("nodejs")
    assert node, "Node.js is needed by the driver tests: run scripts/bootstrap.sh --with-browser"
    assert (DRIVER_DIR / "node_modules" / "@neondatabase" / "serverless").exists(), (
        "the driver is not installed: run scripts/bootstrap.sh --with-browser"
    )
    return node


def test_the_neon_serverless_driver_works_against_pgfleet(api: Api, api_url: str) -> None:
    pinned = json.loads((DRIVER_DIR / "package.json").read_text())["dependencies"]
    installed = json.loads(
        (DRIVER_DIR / "node_modules" / "@neondatabase" / "serverless" / "package.json").read_text()
    )["version"]
    assert installed == pinned["@neondatabase/serverless"] == "1.2.0"
    project = create_ok(api, "edge app", region="eu-central-1")
    rw = project["connection"]
    ro = api.get(f"/v1/projects/{project['id']}/connection", params={"mode": "ro"}).json()

    def url(c: dict[str, str]) -> str:
        return f"postgresql://{c['user']}:{c['password']}@{c['host']}:{c['port']}/{c['database']}"

    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        SQL_ENDPOINT=f"{api_url}/sql",
        RW_URL=url(rw),
        RO_URL=url(ro),
        CA_FILE=str(rw["sslrootcert"]),
    )
    out = subprocess.run(
        [_node(), "check.mjs"],
        cwd=DRIVER_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "ok 9", out.stdout + out.stderr
