"""Who may run SQL on which project, in one round trip (or none): the SQL
API's hot path checks the token and loads the project's row together, and
keeps the answer for a few seconds while change notifications are heard."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from psycopg.rows import dict_row

from pgfleet.auth import expired, well_formed
from pgfleet.crypto import hash_api_token
from pgfleet.errors import NotAuthenticated
from pgfleet.platform.db import AsyncPlatformDB
from pgfleet.platform.owners import Owner

_AUTH_WITH_PROJECT = (
    "SELECT o.id AS o_id, o.name AS o_name, o.is_admin AS o_admin, t.id AS t_id, "
    "t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 min' AS touch, "
    "t.scope, t.expires_at, extract(epoch FROM t.expires_at - now()) AS lives_s, "
    "p.id, p.owner_id, p.region, p.status, p.plan_type, p.connection_info "
    "FROM api_tokens t JOIN owners o ON o.id = t.owner_id "
    "LEFT JOIN tenants p ON p.id = %s "
    "WHERE t.token_hash = %s AND t.revoked_at IS NULL"
)
_TOUCH = "UPDATE api_tokens SET last_used_at = now() WHERE id = %s"
_PROJECT_KEYS = ("id", "owner_id", "region", "status", "plan_type", "connection_info")


def _auth_params(token: str | None, project_id: str) -> tuple[uuid.UUID | None, bytes]:
    token = well_formed(token)
    try:
        pid: uuid.UUID | None = uuid.UUID(str(project_id))
    except ValueError:
        pid = None
    return pid, hash_api_token(token)


def _owner_and_project(row: dict[str, Any]) -> tuple[Owner, dict[str, Any] | None]:
    owner = Owner(row["o_id"], row["o_name"], row["o_admin"], read_only=row["scope"] == "read")
    project = {k: row[k] for k in _PROJECT_KEYS} if row["id"] is not None else None
    return owner, project


AUTH_CHANNEL = "pgfleet_auth"


@dataclass
class _Cached:
    expires: float
    owner: Owner
    project: dict[str, Any]
    keys: tuple[str, str, str]


class AuthCache:
    """(token, project) lookups of the SQL API, kept for `ttl_s` seconds.

    Only used while `live`: while a LISTEN on the `pgfleet_auth` channel is
    up, through which triggers announce every revoked token and every changed
    owner or project (migration 0007), and `invalidate()` drops their entries
    as soon as the notice arrives. A lookup that was in flight when any
    notice arrived is not stored, so nothing read before a change outlives
    it. When the LISTEN connection is lost the cache empties and stays off
    until it is back. Not thread-safe: the event loop's own.
    """

    def __init__(self, ttl_s: float = 5.0, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.live = False
        self.generation = 0
        self.hits = 0
        self._entries: dict[tuple[bytes, str], _Cached] = {}
        self._by_key: dict[str, set[tuple[bytes, str]]] = {}

    def get(self, token_hash: bytes, project_id: str) -> tuple[Owner, dict[str, Any]] | None:
        if not self.live:
            return None
        e = self._entries.get((token_hash, project_id))
        if e is None:
            return None
        if e.expires < time.monotonic():
            self._drop((token_hash, project_id))
            return None
        self.hits += 1
        return e.owner, e.project

    def put(
        self,
        token_hash: bytes,
        project_id: str,
        owner: Owner,
        project: dict[str, Any],
        token_id: uuid.UUID,
        generation: int,
        *,
        lives_s: float | None = None,
    ) -> None:
        """Keep an answer for ttl_s, never past the token's expiry (`lives_s`
        from now)."""
        if not self.live or generation != self.generation:
            return  # a change was announced while this lookup ran
        if len(self._entries) >= self.max_entries:
            self.clear()
        key = (token_hash, project_id)
        keys = (f"k:{token_id}", f"o:{owner.id}", f"t:{project['id']}")
        self._drop(key)
        ttl = self.ttl_s if lives_s is None else min(self.ttl_s, lives_s)
        self._entries[key] = _Cached(time.monotonic() + ttl, owner, project, keys)
        for k in keys:
            self._by_key.setdefault(k, set()).add(key)

    def invalidate(self, notice: str) -> None:
        """A `pgfleet_auth` notice: 'k:<token id>', 'o:<owner id>' or 't:<project id>'."""
        self.generation += 1
        for key in list(self._by_key.get(notice, ())):
            self._drop(key)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._by_key.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: tuple[bytes, str]) -> None:
        e = self._entries.pop(key, None)
        if e is None:
            return
        for k in e.keys:
            refs = self._by_key.get(k)
            if refs is not None:
                refs.discard(key)
                if not refs:
                    del self._by_key[k]


async def authenticate_with_project_async(
    db: AsyncPlatformDB,
    token: str | None,
    project_id: str,
    cache: AuthCache | None = None,
) -> tuple[Owner, dict[str, Any] | None]:
    """authenticate() and the project's row (with connection info) in one
    round trip, on the event loop: the SQL API's hot path; with a `cache`,
    often none. The row is None if there is no such project; visibility is
    still the caller's to check."""
    pid, token_hash = _auth_params(token, project_id)
    if cache is not None:
        hit = cache.get(token_hash, project_id)
        if hit is not None:
            return hit
        generation = cache.generation
    async with db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_AUTH_WITH_PROJECT, (pid, token_hash))
        row = await cur.fetchone()
        if row is None:
            raise NotAuthenticated("invalid or revoked token")
        lives_s = row["lives_s"]
        if lives_s is not None and lives_s <= 0:
            raise expired(row["expires_at"])
        if row["touch"]:
            await conn.execute(_TOUCH, (row["t_id"],))
    owner, project = _owner_and_project(row)
    if cache is not None and project is not None:
        cache.put(
            token_hash,
            project_id,
            owner,
            project,
            row["t_id"],
            generation,
            lives_s=None if lives_s is None else float(lives_s),
        )
    return owner, project
