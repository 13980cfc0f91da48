"""Routers for external servers: pgfleet runs their regions' routers on its
own host, and they reach the servers over TLS verified by the CA each
server is configured with. The "external" server here is the suite's eu
server, configured the way pgfleet.toml's [[servers]] would name it, on a
platform of its own (another data directory, another CA for the routers)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr

from pgfleet.config import ServerSpec
from pgfleet.errors import FleetError
from pgfleet.fleet.embedded import ADMIN_USER, EmbeddedFleet
from pgfleet.platform.core import Platform
from pgfleet.regions import REGION_IDS
from tests.helpers import Api, FleetUnderTest, create_ok, free_port_block
from tests.test_router import conn_of, connect


@pytest.fixture
def ext_home() -> Iterator[Path]:
    # Not under pytest's tmp dir (0700): the routers run as the servers' OS
    # user when the suite runs as root.
    home = Path(tempfile.mkdtemp(prefix="pgfleet-test-ext-"))
    os.chmod(home, 0o755)
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def platform(platform_factory: Any, fleet: FleetUnderTest, ext_home: Path) -> Iterator[Platform]:
    srv = fleet.server("eu-central-1")
    eu = ServerSpec(
        name="ext-eu",
        region="eu-central-1",
        host="127.0.0.1",
        port=srv.port,
        admin_user=ADMIN_USER,
        admin_password=SecretStr(fleet.fleet.admin_password(srv.name)),
        sslmode="verify-full",
        sslrootcert=str(fleet.fleet.ca.cert_path),
        primary=True,
    )
    p: Platform = platform_factory(
        servers=[eu],
        home=ext_home,
        default_region="eu-central-1",
        router_port_base=free_port_block(len(REGION_IDS) * 2),
        backups=False,
    )
    # What `pgfleet up` does with external servers before it serves.
    local = EmbeddedFleet(p.settings)
    local.start_routers()
    try:
        yield p
    finally:
        local.routers.close()
        for spec in local.routers.specs:
            local.routers.stop(spec)


def test_external_servers_get_routers_on_fixed_ports_with_tls_both_ways(
    api: Api, platform: Platform, fleet: FleetUnderTest, ext_home: Path
) -> None:
    s = platform.settings
    assert not s.embedded
    routers = platform.routers
    assert routers is not None
    # Only the regions that have a server get routers, on ports fixed by the
    # region's place in the region list (strings never depend on the others).
    assert [(x.region, x.pool_mode, x.port) for x in routers.specs] == [
        ("eu-central-1", "session", s.router_port_base + 2 * REGION_IDS.index("eu-central-1")),
        (
            "eu-central-1",
            "transaction",
            s.router_port_base + 2 * REGION_IDS.index("eu-central-1") + 1,
        ),
    ]
    p = create_ok(api, "outside", region="eu-central-1")
    c = conn_of(api, p["id"])
    session = routers.spec("eu-central-1", "session")
    assert (c["host"], c["port"], c["direct"], c["router_region"]) == (
        s.router_host,
        session.port,
        False,
        "eu-central-1",
    )
    # Clients verify the routers by this platform's own CA.
    assert c["sslrootcert"] == str(ext_home / "tls" / "ca.crt")
    assert p["connection"]["port"] == session.port
    for pooling in ("session", "transaction"):
        with connect(conn_of(api, p["id"], pooling=pooling)) as conn:
            row = conn.execute(
                "SELECT current_database(), current_setting('port')::int, ssl "
                "FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
        assert row == (c["database"], fleet.server("eu-central-1").port, True)
    # The routers verify the server by the CA its configuration names.
    bundle = ext_home / "routers" / "tls" / "servers-ca.pem"
    assert bundle.read_text() == fleet.fleet.ca.cert_path.read_text()
    ini = routers.paths.ini(session).read_text()
    assert "server_tls_sslmode = verify-full" in ini and str(bundle) in ini
    # The direct string names the server, as before.
    d = conn_of(api, p["id"], direct="true")
    assert (d["port"], d["direct"]) == (fleet.server("eu-central-1").port, True)
    # Another project's database is refused through them.
    other = conn_of(api, create_ok(api, "neighbour", region="eu-central-1")["id"])
    with pytest.raises(psycopg.OperationalError):
        connect({**c, "database": other["database"]})


def test_a_killed_external_router_degrades_its_region_until_started_again(
    api: Api, platform: Platform
) -> None:
    routers = platform.routers
    assert routers is not None
    p = create_ok(api, "ext-kill", region="eu-central-1")
    spec = routers.spec("eu-central-1", "transaction")
    pid = routers.state(spec).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    health = api.get("/health").json()
    eu = health["regions"]["eu-central-1"]
    assert eu["status"] == "degraded", eu
    assert any(r["name"] == spec.name and not r["ok"] for r in eu["routers"])
    assert EmbeddedFleet(platform.settings).start_routers() == [spec]
    assert api.get("/health").json()["regions"]["eu-central-1"]["status"] == "ok"
    with connect(conn_of(api, p["id"], pooling="transaction")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_routers_refuse_an_external_server_below_verify_full(
    fleet: FleetUnderTest, ext_home: Path
) -> None:
    """PgBouncer has one server TLS setting per process: a server configured
    with less than verify-full would weaken the way to every server, so the
    routers do not start and say which server it is."""
    srv = fleet.server("eu-central-1")
    servers = [
        ServerSpec(name="ext-eu", region="eu-central-1", host="127.0.0.1", port=srv.port),
        ServerSpec(
            name="ext-us",
            region="us-east-1",
            host="127.0.0.1",
            port=fleet.server("us-east-1").port,
            sslmode="require",
        ),
    ]
    s = fleet.settings.model_copy(update={"servers": servers, "home": ext_home})
    with pytest.raises(FleetError, match=r"ext-us \(require\)") as e:
        EmbeddedFleet(s).start_routers()
    assert "PGFLEET_ROUTERS=false" in str(e.value)
    assert not (ext_home / "routers").exists()
