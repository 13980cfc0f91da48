"""The engine's advisory locks on the platform DB.

An operation's executor holds two session locks: the operation's own (one
executor per operation) and its resource's (a project's: work on one project
never interleaves). Domain code that changes a resource outside an operation
(the seed's `ensure_tenant_database_provisioned`, a repair) takes the same
resource lock, so it waits for a running operation's step and vice versa.
"""

from __future__ import annotations

import uuid


def resource_lock_key(resource_id: uuid.UUID) -> int:
    """The advisory lock that serialises work on one resource."""
    return int.from_bytes(resource_id.bytes[:8], "big", signed=True)


def resource_lock_key_sql(uuid_sql: str) -> str:
    """resource_lock_key, computed by the platform DB from a uuid expression
    (the text form's first 16 hex digits, as a signed 64-bit integer)."""
    return f"('x' || translate(left(({uuid_sql})::text, 18), '-', ''))::bit(64)::bigint"


def op_lock_key(op_id: uuid.UUID) -> int:
    # Distinct from the resource locks (which use the first 8 bytes).
    return int.from_bytes(op_id.bytes[8:], "big", signed=True)
