"""Owners and API tokens. Tokens are `pgf_` + 256 random bits, stored only as
a SHA-256 hash, shown once, revocable; each may expire, and its scope is
`all` or `read` (list, show and read-only SQL)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg.rows import dict_row

from pgfleet.crypto import TOKEN_PREFIX, generate_api_token, hash_api_token
from pgfleet.display import when
from pgfleet.errors import Conflict, InvalidInput, NotAuthenticated, NotFound
from pgfleet.names import validate_name
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner


def create_owner(
    platform: Platform,
    name: str,
    *,
    is_admin: bool = False,
    token_name: str = "default",  # noqa: S107 - a label
    unique: bool = False,
) -> tuple[Owner, str]:
    """A new owner and its first token (returned in clear, once). With
    `unique` (what the API asks), a name another owner has is 409."""
    name = validate_name(name)
    if unique:
        with platform.db.connection() as conn:
            taken = conn.execute(
                "SELECT id FROM owners WHERE lower(name) = lower(%s) LIMIT 1", (name,)
            ).fetchone()
        if taken is not None:
            raise Conflict(
                f"an owner named {name!r} exists already (id {taken[0]}); choose another name",
                field="name",
            )
    owner = Owner(uuid.uuid4(), name, is_admin)
    token = generate_api_token()
    with platform.db.connection() as conn, conn.transaction():
        conn.execute(
            "INSERT INTO owners (id, name, is_admin) VALUES (%s, %s, %s)",
            (owner.id, owner.name, is_admin),
        )
        _insert_token(conn, owner.id, token_name, token)
    return owner, token


SCOPES = ("all", "read")
# A token lives at most this long when it has an expiry (ten years).
MAX_TOKEN_DAYS = 3650


def _insert_token(
    conn: Any,
    owner_id: uuid.UUID,
    name: str,
    token: str,
    *,
    scope: str = "all",
    expires_in_days: int | None = None,
    not_after: datetime | None = None,
) -> tuple[uuid.UUID, datetime | None]:
    """The new token's id and expiry: `expires_in_days` from now, and never
    after `not_after` (least() passes over a NULL: either alone holds)."""
    tid = uuid.uuid4()
    row = conn.execute(
        "INSERT INTO api_tokens (id, owner_id, name, token_hash, token_prefix, scope, "
        "expires_at) VALUES (%s, %s, %s, %s, %s, %s, "
        "least(now() + make_interval(days => %s), %s::timestamptz)) RETURNING expires_at",
        (
            tid,
            owner_id,
            name,
            hash_api_token(token),
            token[: len(TOKEN_PREFIX) + 6],
            scope,
            expires_in_days,
            not_after,
        ),
    ).fetchone()
    return tid, row[0]


def create_token(
    platform: Platform,
    owner: Owner,
    name: str,
    *,
    scope: str = "all",
    expires_in_days: int | None = None,
) -> tuple[uuid.UUID, str, datetime | None]:
    """A new token of `owner`: its id, its value (returned in clear, once)
    and when it expires. `scope` read: it may list, show and run read-only
    SQL only. A read-only token cannot make tokens (api.deps refuses it
    every change); one made with a token that expires expires by then."""
    name = validate_name(name)
    if scope not in SCOPES:
        raise InvalidInput(f"unknown scope {scope!r}; valid scopes are: all, read", field="scope")
    if expires_in_days is not None and not 1 <= expires_in_days <= MAX_TOKEN_DAYS:
        raise InvalidInput(
            f"expires_in_days must be 1 to {MAX_TOKEN_DAYS} (or omitted: no expiry), "
            f"not {expires_in_days}",
            field="expires_in_days",
        )
    limit = owner.token_expires_at
    if (
        limit is not None
        and expires_in_days is not None
        and datetime.now(UTC) + timedelta(days=expires_in_days) > limit
    ):
        raise InvalidInput(
            f"the token making this one expires at {when(limit)}: a token it makes "
            "cannot outlive it; ask for fewer days, or omit expires_in_days to expire then",
            field="expires_in_days",
        )
    token = generate_api_token()
    with platform.db.connection() as conn:
        tid, expires_at = _insert_token(
            conn,
            owner.id,
            name,
            token,
            scope=scope,
            expires_in_days=expires_in_days,
            not_after=limit,
        )
    return tid, token, expires_at


def list_tokens(platform: Platform, owner: Owner) -> list[dict[str, Any]]:
    return list_tokens_of(platform, owner.id)


def list_tokens_of(platform: Platform, owner_id: uuid.UUID) -> list[dict[str, Any]]:
    with platform.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT id, name, token_prefix, scope, created_at, expires_at, last_used_at, "
            "revoked_at, (expires_at IS NOT NULL AND expires_at <= now()) AS expired "
            "FROM api_tokens WHERE owner_id = %s ORDER BY created_at",
            (owner_id,),
        ).fetchall()


def revoke_token(platform: Platform, owner: Owner, token_id: str) -> None:
    """Revoke one of `owner`'s tokens (an admin's console may name another
    owner's: revoke_any_token)."""
    _revoke(platform, token_id, owner.id)


def revoke_any_token(platform: Platform, admin: Owner, token_id: str) -> None:
    if not admin.is_admin:
        raise NotFound(f"token {token_id} not found")
    _revoke(platform, token_id, None)


def _revoke(platform: Platform, token_id: str, owner_id: uuid.UUID | None) -> None:
    try:
        tid = uuid.UUID(token_id)
    except ValueError:
        raise NotFound(f"token {token_id} not found") from None
    with platform.db.connection() as conn:
        cur = conn.execute(
            "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) "
            "WHERE id = %s AND (%s::uuid IS NULL OR owner_id = %s)",
            (tid, owner_id, owner_id),
        )
        if cur.rowcount == 0:
            raise NotFound(f"token {token_id} not found")


def owner_id(platform: Platform, ref: str) -> uuid.UUID:
    """The id of an existing owner, or 404."""
    try:
        oid = uuid.UUID(ref)
    except ValueError:
        raise NotFound(f"owner {ref} not found") from None
    with platform.db.connection() as conn:
        if conn.execute("SELECT 1 FROM owners WHERE id = %s", (oid,)).fetchone() is None:
            raise NotFound(f"owner {ref} not found")
    return oid


def list_owners(platform: Platform) -> list[dict[str, Any]]:
    with platform.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT o.id, o.name, o.is_admin, o.created_at, "
            "(SELECT count(*) FROM tenants t WHERE t.owner_id = o.id "
            " AND t.status <> 'deleted') AS projects "
            "FROM owners o ORDER BY o.created_at"
        ).fetchall()


def well_formed(token: str | None) -> str:
    if not token:
        raise NotAuthenticated("missing bearer token: send 'Authorization: Bearer pgf_...'")
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        raise NotAuthenticated("invalid token")
    return token


def authenticate(platform: Platform, token: str | None) -> Owner:
    return authenticate_token(platform, token)[0]


def authenticate_token(platform: Platform, token: str | None) -> tuple[Owner, uuid.UUID]:
    """The token's owner and the token's id (the console's sessions keep it)."""
    token = well_formed(token)
    with platform.db.connection() as conn:
        row = conn.execute(
            "SELECT o.id, o.name, o.is_admin, t.id, "
            "t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 min', "
            "t.scope, t.expires_at, t.expires_at <= now() "
            "FROM api_tokens t JOIN owners o ON o.id = t.owner_id "
            "WHERE t.token_hash = %s AND t.revoked_at IS NULL",
            (hash_api_token(token),),
        ).fetchone()
        if row is None:
            raise NotAuthenticated("invalid or revoked token")
        if row[7]:
            raise expired(row[6])
        if row[4]:  # last_used_at is kept to the minute, not written on every call
            conn.execute("UPDATE api_tokens SET last_used_at = now() WHERE id = %s", (row[3],))
    return Owner(row[0], row[1], row[2], read_only=row[5] == "read", token_expires_at=row[6]), row[
        3
    ]


def expired(at: datetime) -> NotAuthenticated:
    return NotAuthenticated(
        f"this token expired at {when(at)}; create a new one (`pgfleet tokens create`)"
    )


def ensure_admin_token(platform: Platform, existing: str | None) -> str | None:
    """Return None if `existing` still authenticates as an admin, else a new
    admin owner's token."""
    if existing:
        try:
            if authenticate(platform, existing).is_admin:
                return None
        except NotAuthenticated:
            pass
    _, token = create_owner(platform, "admin", is_admin=True, token_name="created by pgfleet up")  # noqa: S106
    return token
