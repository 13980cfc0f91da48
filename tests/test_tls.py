"""TLS everywhere: connection strings pgfleet hands out verify the server,
plaintext is refused by pg_hba, pgfleet's own connections verify too, and
certificates are renewed before they expire."""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from cryptography import x509

from pgfleet.config import ServerSpec
from pgfleet.fleet import tls
from pgfleet.fleet.tls import FleetCA
from pgfleet.platform.core import Platform, warn_weak_tls
from tests.helpers import Api, FleetUnderTest, create_ok, run_psql, tenant_client

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def server_certificate(port: int) -> x509.Certificate:
    """The certificate a PostgreSQL server presents (after its SSLRequest)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(SSL_REQUEST)
        assert raw.recv(1) == b"S", "the server does not speak TLS"
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_handed_out_uri_verifies_the_server_and_works_in_psql_and_psycopg(api: Api) -> None:
    project = create_ok(api, "tls", region="ap-southeast-1")
    uri = project["connection"]["uri"]
    query = parse_qs(urlsplit(uri).query)
    assert query["sslmode"] == ["verify-full"]
    ca = Path(query["sslrootcert"][0])
    assert ca.is_file() and "BEGIN CERTIFICATE" in ca.read_text()
    assert project["connection"]["sslrootcert"] == str(ca)
    # The handed-out string names the router: TLS to it, verified.
    res = run_psql(uri, "select 1")
    assert res.returncode == 0, res.stderr
    with psycopg.connect(uri) as c:
        assert c.pgconn.ssl_in_use
    # The direct string: TLS to the server itself, as the server sees it.
    direct = api.get(f"/v1/projects/{project['id']}/connection", params={"direct": "true"})
    res = run_psql(
        direct.json()["uri"], "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("t|TLSv1."), res.stdout
    ro = api.get(f"/v1/projects/{project['id']}/connection", params={"mode": "ro"}).json()
    assert "sslmode=verify-full" in ro["uri"] and ro["sslrootcert"] == str(ca)


def test_plaintext_is_refused_by_pg_hba(api: Api) -> None:
    project = create_ok(api, "plain", region="eu-central-1")
    direct = api.get(f"/v1/projects/{project['id']}/connection", params={"direct": "true"}).json()
    uri = direct["uri"].replace("sslmode=verify-full", "sslmode=disable")
    res = run_psql(uri, "select 1")
    assert res.returncode != 0
    assert "no encryption" in res.stderr, res.stderr
    # The router the handed-out string names refuses plaintext too.
    routed = project["connection"]["uri"].replace("sslmode=verify-full", "sslmode=disable")
    res = run_psql(routed, "select 1")
    assert res.returncode != 0
    assert "SSL required" in res.stderr, res.stderr


def test_verification_is_real_another_ca_or_another_name_fails(api: Api, tmp_path: Path) -> None:
    project = create_ok(api, "mitm", region="us-east-1")
    c = project["connection"]
    other = FleetCA(tmp_path / "other")
    other.ensure()
    base = {
        "host": c["host"],
        "port": c["port"],
        "dbname": c["database"],
        "user": c["user"],
        "password": c["password"],
        "sslmode": "verify-full",
        "connect_timeout": 5,
    }
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(**base, sslrootcert=str(other.cert_path)).close()
    # The right CA, but reached by a name the certificate does not carry.
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        psycopg.connect(
            **{**base, "host": "db.example.com", "hostaddr": "127.0.0.1"},
            sslrootcert=c["sslrootcert"],
        ).close()


def test_pgfleets_own_connections_are_tls(
    api: Api, platform: Platform, fleet: FleetUnderTest
) -> None:
    create_ok(api, "own", region="us-east-1")
    with tenant_client(platform).get_tenant_connection(
        api.get("/v1/projects").json()["projects"][0]["id"]
    ) as tc:
        tc.execute("select 1")
    for server in platform.servers.all():
        assert server.sslmode == "verify-full" and server.sslrootcert
    assert platform.conninfo["sslmode"] == "verify-full"
    for region in [None, *fleet.regions()]:
        with fleet.admin_conn(region) as a:
            plain = a.execute(
                "SELECT a.application_name, a.usename FROM pg_stat_activity a "
                "JOIN pg_stat_ssl s USING (pid) WHERE a.backend_type = 'client backend' "
                "AND NOT s.ssl"
            ).fetchall()
        assert plain == [], f"plaintext sessions on {region or 'platform'}: {plain}"


def test_ca_certificate_is_downloadable(client: Any, fleet: FleetUnderTest) -> None:
    r = client.get("/ca.crt")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-pem-file")
    assert r.text == fleet.fleet.ca.cert_path.read_text()
    cert = x509.load_pem_x509_certificate(r.text.encode())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_key_files_are_private(fleet: FleetUnderTest) -> None:
    assert fleet.fleet.ca.key_path.stat().st_mode & 0o077 == 0
    for srv in fleet.fleet.servers():
        key = fleet.fleet.tls_dir(srv.name) / "server.key"
        assert key.stat().st_mode & 0o077 == 0, key


def test_a_certificate_about_to_expire_is_renewed_and_served(
    fleet: FleetUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = fleet.server("eu-central-1")
    tls_dir = fleet.fleet.tls_dir(srv.name)
    # Reissue it with 10 days left: less than RENEW_BEFORE.
    monkeypatch.setattr(tls, "CERT_LIFETIME", timedelta(days=10))
    (tls_dir / "server.crt").unlink()
    fleet.fleet.ensure_certificate(srv)
    subprocess.run(
        [fleet.fleet.bins.path("pg_ctl"), "reload", "-D", str(fleet.fleet.data_dir(srv.name))],
        check=False,
        capture_output=True,
        user=fleet.fleet._os_user()[0] if fleet.fleet._as_root() else None,
    )
    short = x509.load_pem_x509_certificate((tls_dir / "server.crt").read_bytes())
    assert tls.expires_soon(short)
    monkeypatch.undo()

    assert fleet.fleet.renew_certificates() == [srv.name]
    fresh = x509.load_pem_x509_certificate((tls_dir / "server.crt").read_bytes())
    assert not tls.expires_soon(fresh)
    assert fresh.serial_number != short.serial_number
    # The running server presents the new one (reloaded), and clients verify it.
    assert server_certificate(srv.port).serial_number == fresh.serial_number
    with fleet.admin_conn("eu-central-1") as a:
        assert a.execute("select 1").fetchone() == (1,)
    assert fleet.fleet.renew_certificates() == []  # nothing left to renew


def test_weaker_sslmode_on_external_servers_is_warned_about(
    caplog: pytest.LogCaptureFixture, fleet: FleetUnderTest
) -> None:
    settings = fleet.settings.model_copy(
        update={
            "servers": [
                ServerSpec(name="eu-x", region="eu-central-1", host="db-eu", sslmode="require"),
                ServerSpec(name="us-x", region="us-east-1", host="db-us"),
            ]
        }
    )
    with caplog.at_level(logging.WARNING):
        warnings = warn_weak_tls(settings)
    assert len(warnings) == 1 and "eu-x" in warnings[0] and "sslmode=require" in warnings[0]
    assert "verify-full" in caplog.text
    assert ServerSpec(name="d", region="us-east-1", host="h").sslmode == "verify-full"
