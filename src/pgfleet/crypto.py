"""Secrets at rest: tenant and server passwords are Fernet tokens in the
platform DB. Keys come from settings (newest first, so a new key can be added
in front and old tokens still decrypt) or, in development, from a key file
generated with mode 0600 into the data directory."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from pgfleet.config import Settings
from pgfleet.errors import ConfigError

TOKEN_PREFIX = "pgf_"  # noqa: S105 - a prefix, not a secret


def write_private(path: Path, content: str, *, owner: tuple[int, int] | None = None) -> None:
    """Write a file only its owner can read (0600), atomically (a temporary
    file per process, so concurrent writers never share one); with `owner`,
    given to that uid/gid first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    if owner is not None:
        os.chown(tmp, *owner)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class SecretBox:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ConfigError("at least one secret key is required")
        self._fernet = MultiFernet([Fernet(k) for k in keys])

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        if settings.secret_keys:
            return cls([k.get_secret_value().encode() for k in settings.secret_keys])
        path = settings.home_abs / "secrets" / "fernet.key"
        if not path.exists():
            write_private(path, Fernet.generate_key().decode() + "\n")
        return cls([path.read_text().strip().encode()])

    def encrypt(self, plaintext: str, *, at: int | None = None) -> str:
        """Encrypt; `at` (Unix time) backdates the token, which only a test
        of expiry needs."""
        if at is not None:
            return self._fernet.encrypt_at_time(plaintext.encode(), at).decode()
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise ConfigError(
                "a stored secret cannot be decrypted with the configured keys"
            ) from None

    def open_fresh(self, token: str, ttl_s: int) -> str | None:
        """Decrypt a token made at most `ttl_s` seconds ago; None if it is
        forged, tampered with, made with an unknown key or too old."""
        try:
            return self._fernet.decrypt(token.encode(), ttl=ttl_s).decode()
        except (InvalidToken, ValueError, UnicodeError):
            return None

    def rotate(self, token: str) -> str:
        """Re-encrypt with the newest key."""
        return self._fernet.rotate(token.encode()).decode()


def generate_password() -> str:
    """192 random bits, URL-safe base64: what every password pgfleet makes is."""
    return secrets.token_urlsafe(24)


# PBKDF2's iterations make each guess at a password cost more, which is what
# protects a password a person chose (few bits of entropy) if its verifier
# leaks. A password pgfleet made has 192 random bits: nobody searches that
# space, at one iteration or at 4,096. The iterations then only cost every
# login: the client derives the key again each time (about 6 ms at 4,096 on
# this class of machine, the larger part of a login over loopback). So
# machine-made passwords get verifiers of MACHINE_SCRAM_ITERATIONS; a password
# a person chose keeps PostgreSQL's default of 4,096. PostgreSQL 15 accepts
# any count in a stored verifier (16 adds `scram_iterations` to choose it).
MACHINE_SCRAM_ITERATIONS = 16
PERSON_SCRAM_ITERATIONS = 4096


def is_machine_made(password: str) -> bool:
    """Whether `password` has the shape generate_password gives (32
    characters of URL-safe base64). Shape is not provenance: callers that
    know a person chose the password say so."""
    return len(password) == 32 and all(c.isascii() and (c.isalnum() or c in "-_") for c in password)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scram_sha256_verifier(password: str, iterations: int, salt: bytes | None = None) -> str:
    """A SCRAM-SHA-256 verifier as PostgreSQL stores it (RFC 5802 / 7677):
    `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`. Only for
    printable ASCII passwords, which SASLprep leaves as they are."""
    if not (password.isascii() and password.isprintable()):
        raise ValueError("only printable ASCII passwords are derived here")
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    return f"SCRAM-SHA-256${iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def scram_iterations(verifier: str) -> int | None:
    """The iteration count of a SCRAM-SHA-256 verifier, None if it is not one."""
    try:
        method, rest = verifier.split("$", 1)
        return int(rest.split(":", 1)[0]) if method == "SCRAM-SHA-256" else None
    except ValueError:
        return None


def verifier_matches(verifier: str, password: str) -> bool:
    """Whether a SCRAM-SHA-256 verifier was made from `password` (printable
    ASCII, which SASLprep leaves as it is), whatever its iteration count."""
    try:
        method, rest = verifier.split("$", 1)
        iter_salt, keys = rest.split("$", 1)
        iterations, salt = iter_salt.split(":", 1)
        if method != "SCRAM-SHA-256":
            return False
        expected = scram_sha256_verifier(password, int(iterations), base64.b64decode(salt))
    except ValueError:
        return False
    return hmac.compare_digest(expected.rsplit("$", 1)[1], keys)


def generate_api_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_api_token(token: str) -> bytes:
    """API tokens carry 256 bits of randomness, so a plain SHA-256 is enough."""
    return hashlib.sha256(token.encode()).digest()
