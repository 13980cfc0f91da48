"""Secrets at rest: tenant and server passwords are Fernet tokens in the
platform DB. Keys come from settings (newest first, so a new key can be added
in front and old tokens still decrypt) or, in development, from a key file
generated with mode 0600 into the data directory."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from pgfleet.config import Settings
from pgfleet.errors import ConfigError

TOKEN_PREFIX = "pgf_"  # noqa: S105 - a prefix, not a secret


def write_private(path: Path, content: str) -> None:
    """Write a file only its owner can read (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)
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
    return secrets.token_urlsafe(24)


def generate_api_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_api_token(token: str) -> bytes:
    """API tokens carry 256 bits of randomness, so a plain SHA-256 is enough."""
    return hashlib.sha256(token.encode()).digest()
