"""Console sessions and CSRF.

The session cookie is a Fernet token (encrypted and signed with the
platform's secret keys, so it can be neither read nor forged) holding the
session's id, the owner, the API token's id and the session's CSRF secret;
it expires after `PGFLEET_SESSION_TTL_S`. It is HttpOnly and
SameSite=Strict. Every request checks that the session is still open (a row
in `console_sessions`: signing out ends it on the server, so a copy of the
cookie stops working too) and that the token it came from is still valid
(revoking the token ends its console sessions). Every form carries the
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
    id: uuid.UUID


def issue(
    platform: Platform, response: Response, owner: Owner, token_id: uuid.UUID, *, secure: bool
) -> None:
    sid = uuid.uuid4()
    ttl = platform.settings.session_ttl_s
    with platform.db.connection() as conn, conn.transaction():
        # Sessions a day past their end go as new ones start.
        conn.execute("DELETE FROM console_sessions WHERE expires_at < now() - interval '1 day'")
        conn.execute(
            "INSERT INTO console_sessions (id, owner_id, token_id, expires_at) "
            "VALUES (%s, %s, %s, now() + make_interval(secs => %s))",
            (sid, owner.id, token_id, ttl),
        )
    payload = json.dumps(
        {"s": str(sid), "o": str(owner.id), "t": str(token_id), "c": secrets.token_urlsafe(24)}
    )
    response.set_cookie(
        COOKIE,
        platform.secrets.encrypt(payload),
        max_age=platform.settings.session_ttl_s,
        httponly=True,
        samesite="strict",
        secure=secure,
        path="/",
    )


def end(platform: Platform, session: Session, response: Response) -> None:
    """Sign out: the session ends on the server, and the cookie goes."""
    with platform.db.connection() as conn:
        conn.execute(
            "UPDATE console_sessions SET ended_at = now() WHERE id = %s AND ended_at IS NULL",
            (session.id,),
        )
    clear(response)


def clear(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")


def current(platform: Platform, request: Request) -> Session | None:
    """The request's session, or None (no cookie, forged, expired, token
    revoked or expired)."""
    raw = request.cookies.get(COOKIE)
    if not raw:
        return None
    opened = platform.secrets.open_fresh(raw, platform.settings.session_ttl_s)
    if opened is None:
        return None
    try:
        data = json.loads(opened)
        sid, owner_id = uuid.UUID(data["s"]), uuid.UUID(data["o"])
        token_id, csrf = uuid.UUID(data["t"]), str(data["c"])
    except (ValueError, KeyError, TypeError):
        return None
    with platform.db.connection() as conn:
        row = conn.execute(
            "SELECT o.id, o.name, o.is_admin, t.expires_at FROM console_sessions s "
            "JOIN api_tokens t ON t.id = s.token_id JOIN owners o ON o.id = t.owner_id "
            "WHERE s.id = %s AND s.ended_at IS NULL AND s.expires_at > now() "
            "AND t.id = %s AND o.id = %s AND t.revoked_at IS NULL "
            "AND (t.expires_at IS NULL OR t.expires_at > now())",
            (sid, token_id, owner_id),
        ).fetchone()
    if row is None:
        return None
    return Session(Owner(row[0], row[1], row[2], token_expires_at=row[3]), token_id, csrf, sid)


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
