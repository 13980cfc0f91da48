"""Idempotency-Key for POST requests.

The first request with a key runs and its response (status and body) is
stored with a hash of the request; a repeat with the same key and the same
request gets the stored response back (header `Idempotent-Replayed: true`)
and creates nothing. The same key with a different request is 422; a repeat
while the first is still running is 409. A request that fails stores
nothing, so it can be retried with its key. Keys are per owner and kept for
`PGFLEET_IDEMPOTENCY_RETENTION_H` hours; stored responses are encrypted
like every other secret (a create's response holds a password).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from pgfleet.errors import Conflict, InvalidInput
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner

HEADER = "Idempotency-Key"
KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
KEY_RULE = "1 to 255 visible ASCII characters (a UUID is a good choice)"


class IdempotencyKeyReused(InvalidInput):
    """The Idempotency-Key was used with a different request."""

    code = "idempotency_key_reused"


def _abandoned(platform: Platform, owner: Owner, key: str) -> bool:
    """Delete and report a pending key older than any request can take (the
    longest wait plus a margin): its process is gone."""
    with platform.db.connection() as conn:
        gone = conn.execute(
            "DELETE FROM idempotency_keys WHERE owner_id = %s AND key = %s "
            "AND status_code IS NULL AND created_at < now() - make_interval(secs => %s) "
            "RETURNING 1",
            (owner.id, key, platform.settings.operation_wait_s + 60),
        ).fetchone()
    return gone is not None


def encoded(payload: Any) -> Any:
    """A response body as JSON values. A model is dumped by pydantic-core in
    one call, with what jsonable_encoder would give (JSON mode, aliases):
    jsonable_encoder walks the dump again in Python, about 230 calls for a
    create's answer (counted with yappi)."""
    if isinstance(payload, BaseModel):
        return payload.model_dump(mode="json", by_alias=True)
    return jsonable_encoder(payload)


def check_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not KEY_RE.match(key):
        raise InvalidInput(
            f"{HEADER} must be {KEY_RULE}; got {len(key)} character(s)"
            + (" including spaces or non-ASCII characters" if key and len(key) <= 255 else ""),
            field=HEADER,
        )
    return key


def run_idempotent(
    platform: Platform,
    owner: Owner,
    key: str | None,
    *,
    method: str,
    path: str,
    body: Any,
    produce: Callable[[], tuple[int, Any]],
) -> JSONResponse:
    key = check_key(key)
    if key is None:
        status, payload = produce()
        return JSONResponse(encoded(payload), status_code=status)
    digest = hashlib.sha256(
        json.dumps([method, path, jsonable_encoder(body)], sort_keys=True).encode()
    ).hexdigest()
    with platform.db.connection() as conn:
        conn.execute(
            "DELETE FROM idempotency_keys WHERE owner_id = %s AND key = %s "
            "AND created_at < now() - make_interval(hours => %s)",
            (owner.id, key, platform.settings.idempotency_retention_h),
        )
        inserted = conn.execute(
            "INSERT INTO idempotency_keys (owner_id, key, method, path, request_hash) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
            (owner.id, key, method, path, digest),
        ).fetchone()
        if inserted is None:
            row = conn.execute(
                "SELECT request_hash, status_code, response, method, path FROM idempotency_keys "
                "WHERE owner_id = %s AND key = %s",
                (owner.id, key),
            ).fetchone()
            if row is not None:
                if row[0] != digest:
                    raise IdempotencyKeyReused(
                        f"{HEADER} {key!r} was already used with a different request "
                        f"({row[3]} {row[4]} with another body); use a new key for a new request",
                        field=HEADER,
                    )
                if row[1] is None and _abandoned(platform, owner, key):
                    # The process that took the key died before answering.
                    return run_idempotent(
                        platform, owner, key, method=method, path=path, body=body, produce=produce
                    )
                if row[1] is None:
                    raise Conflict(
                        f"the request with {HEADER} {key!r} is still being processed; "
                        "repeat it once that one has answered",
                        field=HEADER,
                    )
                return JSONResponse(
                    json.loads(platform.secrets.decrypt(row[2]["enc"])),
                    status_code=row[1],
                    headers={"Idempotent-Replayed": "true"},
                )
            # The old row expired between the two statements: run it afresh.
            return run_idempotent(
                platform, owner, key, method=method, path=path, body=body, produce=produce
            )
    try:
        status, payload = produce()
    except BaseException:
        with platform.db.connection() as conn:
            conn.execute(
                "DELETE FROM idempotency_keys WHERE owner_id = %s AND key = %s", (owner.id, key)
            )
        raise
    body_out = encoded(payload)
    with platform.db.connection() as conn:
        conn.execute(
            "UPDATE idempotency_keys SET status_code = %s, response = %s "
            "WHERE owner_id = %s AND key = %s",
            # Encrypted: a create's response holds the project's password.
            (status, Jsonb({"enc": platform.secrets.encrypt(json.dumps(body_out))}), owner.id, key),
        )
    return JSONResponse(body_out, status_code=status)
