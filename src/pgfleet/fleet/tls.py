"""The fleet's certificate authority and the embedded servers' certificates.

At the first `pgfleet up` a CA is made under `$PGFLEET_HOME/tls/`
(`ca.crt`, public; `ca.key`, 0600) and every embedded server gets a
certificate signed by it for the names it is reached by (127.0.0.1 and
localhost). Clients verify servers with `sslmode=verify-full` and
`sslrootcert=ca.crt`. Certificates are renewed when less than
`RENEW_BEFORE` of their life is left (checked at every start and by the
API's background loop); a CA that is about to expire is replaced, and every
server certificate with it.

EC P-256 keys: a TLS handshake with them costs a fraction of an RSA one,
which matters when a client opens many short connections.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pgfleet.crypto import write_private

CA_LIFETIME = timedelta(days=3650)
CERT_LIFETIME = timedelta(days=397)
RENEW_BEFORE = timedelta(days=30)


def _now() -> datetime:
    return datetime.now(UTC)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def expires_soon(cert: x509.Certificate, now: datetime | None = None) -> bool:
    return cert.not_valid_after_utc - (now or _now()) < RENEW_BEFORE


@dataclass(frozen=True)
class Issued:
    cert_path: Path
    key_path: Path
    renewed: bool


class FleetCA:
    """The CA in `directory` (made on first use)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @property
    def cert_path(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def key_path(self) -> Path:
        return self.dir / "ca.key"

    def exists(self) -> bool:
        return self.cert_path.exists() and self.key_path.exists()

    def ensure(self) -> bool:
        """Make the CA if it is missing or about to expire; True if it was made."""
        if self.exists():
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            if not expires_soon(cert):
                return False
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)  # noqa: S103 - ca.crt is public; ca.key is 0600
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pgfleet"),
                x509.NameAttribute(NameOID.COMMON_NAME, "pgfleet fleet CA"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        write_private(self.key_path, _key_pem(key).decode())
        _write_public(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return True

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    def issue_server(
        self,
        common_name: str,
        hosts: list[str],
        cert_path: Path,
        key_path: Path,
        *,
        owner: tuple[int, int] | None = None,
    ) -> Issued:
        """A server certificate for `hosts` (IP addresses or DNS names),
        written unless a valid one from this CA for the same names is there.
        The key is 0600 and, with `owner`, given to that uid/gid (PostgreSQL
        refuses a key file that others can read)."""
        ca_cert, ca_key = self._load()
        if cert_path.exists() and key_path.exists():
            try:
                current = x509.load_pem_x509_certificate(cert_path.read_bytes())
                if (
                    current.issuer == ca_cert.subject
                    and not expires_soon(current)
                    and _sans(current) == sorted(hosts)
                    and _signed_by(current, ca_cert)
                ):
                    return Issued(cert_path, key_path, renewed=False)
            except ValueError:
                pass  # unreadable: issue a new one
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for h in hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                alt.append(x509.DNSName(h))
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pgfleet"),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(min(now + CERT_LIFETIME, ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        write_private(key_path, _key_pem(key).decode())
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        if owner is not None:
            for p in (cert_path, key_path):
                os.chown(p, *owner)
        return Issued(cert_path, key_path, renewed=True)


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = [str(v) for v in ext.get_values_for_type(x509.IPAddress)]
    names += list(ext.get_values_for_type(x509.DNSName))
    return sorted(names)


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # InvalidSignature, or a key of another type
        return False
    return True


def not_after(path: Path) -> datetime | None:
    """When the certificate in `path` expires (None if there is none)."""
    if not path.exists():
        return None
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc
