"""Console sessions and CSRF.

The session cookie is a Fernet token (encrypted and signed with the
platform's secret keys, so it can be neither read nor forged) holding the
owner, the API token's id and the session's CSRF secret; it expires after
`PGFLEET_SESSION_TTL_S`. It is HttpOnly and SameSite=Strict. Every request
checks that the token it came from is still valid (not revoked), so
revoking the token ends its console sessions too. Every form carries the
session's CSRF token; a POST without it, or with another, is 403.
"""

from __future__ import annotations

import hmac
import json
import secrets
import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner

COOKIE = "pgfleet_session"


@dataclass(frozen=True)
class Session:
    owner: Owner
    token_id: uuid.UUID
    csrf: str


def issue(
    platform: Platform, response: Response, owner: Owner, token_id: uuid.UUID, *, secure: bool
) -> None:
    payload = json.dumps({"o": str(owner.id), "t": str(token_id), "c": secrets.token_urlsafe(24)})
    response.set_cookie(
        COOKIE,
        platform.secrets.encrypt(payload),
        max_age=platform.settings.session_ttl_s,
        httponly=True,
        samesite="strict",
        secure=secure,
        path="/",
    )


def clear(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")


def current(platform: Platform, request: Request) -> Session | None:
    """The request's session, or None (no cookie, forged, expired, token revoked)."""
    raw = request.cookies.get(COOKIE)
    if not raw:
        return None
    opened = platform.secrets.open_fresh(raw, platform.settings.session_ttl_s)
    if opened is None:
        return None
    try:
        data = json.loads(opened)
        owner_id, token_id, csrf = uuid.UUID(data["o"]), uuid.UUID(data["t"]), str(data["c"])
    except (ValueError, KeyError, TypeError):
        return None
    with platform.db.connection() as conn:
        row = conn.execute(
            "SELECT o.id, o.name, o.is_admin FROM api_tokens t JOIN owners o ON o.id = t.owner_id "
            "WHERE t.id = %s AND o.id = %s AND t.revoked_at IS NULL",
            (token_id, owner_id),
        ).fetchone()
    if row is None:
        return None
    return Session(Owner(row[0], row[1], row[2]), token_id, csrf)


_SIGNIN_PURPOSE = "signin-csrf:"


def signin_csrf_token(platform: Platform) -> str:
    """A CSRF token for the sign-in form, signed (and encrypted) with the
    platform's secret keys, so only this server can have made it."""
    return platform.secrets.encrypt(_SIGNIN_PURPOSE + secrets.token_urlsafe(18))


def signin_csrf_valid(platform: Platform, token: str, ttl_s: int) -> bool:
    opened = platform.secrets.open_fresh(token, ttl_s)
    return opened is not None and opened.startswith(_SIGNIN_PURPOSE)


def csrf_ok(session: Session, submitted: str | None) -> bool:
    return bool(submitted) and hmac.compare_digest(session.csrf, submitted or "")
