"""What every new database on a regional server starts with: `template1`,
which CREATE DATABASE copies (spares included).

PostgreSQL lets any role create large objects (`lo_create` and friends are
executable by PUBLIC, and a large object needs no CREATE privilege), so a
project's read-only role could write to its database that way. In
`template1` those functions are executable by `pg_database_owner` only,
which inside a project's database is its `_rw` role; new databases copy that.
The admin may enter `template1` (no tenant can: pg_hba admits a project's
roles to their own database only), never a project's database, so databases
made before a server got this keep PUBLIC's grant (see the README).
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg

from pgfleet.fleet.registry import ServerRecord
from pgfleet.platform.core import Platform

# The functions that create a large object (writing to one needs UPDATE on
# it, which a read-only role has on none; lo_import is superuser-only).
LO_CREATE_FUNCTIONS = (
    "pg_catalog.lo_creat(integer)",
    "pg_catalog.lo_create(oid)",
    "pg_catalog.lo_from_bytea(oid, bytea)",
)

_ready: set[tuple[str, int, int]] = set()
_lock = threading.Lock()


def _system_id(aconn: psycopg.Connection[Any]) -> int:
    row = aconn.execute("SELECT system_identifier FROM pg_catalog.pg_control_system()").fetchone()
    return int(row[0]) if row else 0


# Set on template1 once it is prepared: a shared catalog entry, so any
# process sees it from the admin database without entering template1.
MARK = "pgfleet: template1 prepared (large objects created by database owners only)"
_TEMPLATE_LOCK = 0x74656D706C  # "templ": one preparer per server at a time


def _marked(aconn: psycopg.Connection[Any]) -> bool:
    row = aconn.execute(
        "SELECT pg_catalog.shobj_description(oid, 'pg_database') FROM pg_catalog.pg_database "
        "WHERE datname = 'template1'"
    ).fetchone()
    return bool(row and row[0] == MARK)


def ensure_template(p: Platform, server: ServerRecord, aconn: psycopg.Connection[Any]) -> bool:
    """Make `template1` on `server` what new databases must copy. `aconn` is
    an admin connection to the server. True if this call changed it.

    Done once per server: the mark on template1 says it is done, and the
    work runs under a server-wide advisory lock, because a session inside
    template1 makes every concurrent CREATE DATABASE fail ("source database
    is being accessed by other users") and two concurrent GRANTs on one
    function fail too ("tuple concurrently updated")."""
    key = (server.host, server.port, _system_id(aconn))
    with _lock:
        if key in _ready:
            return False
    changed = False
    if not _marked(aconn):
        aconn.execute("SELECT pg_catalog.pg_advisory_lock(%s)", (_TEMPLATE_LOCK,))
        try:
            if not _marked(aconn):
                changed = _prepare(p, server)
                aconn.execute(f"COMMENT ON DATABASE template1 IS '{MARK}'")
        finally:
            aconn.execute("SELECT pg_catalog.pg_advisory_unlock(%s)", (_TEMPLATE_LOCK,))
    with _lock:
        _ready.add(key)
    return changed


def _prepare(p: Platform, server: ServerRecord) -> bool:
    functions = ", ".join(LO_CREATE_FUNCTIONS)
    with p.servers.template_session(server) as tconn, tconn.transaction():
        public = tconn.execute(
            "SELECT bool_or(has_function_privilege('public', f::regprocedure, 'EXECUTE')) "
            "FROM unnest(%s::text[]) AS f",
            (list(LO_CREATE_FUNCTIONS),),
        ).fetchone()
        if not (public and public[0]):
            return False
        # Statements built from the constants above only (no input).
        tconn.execute(f"REVOKE EXECUTE ON FUNCTION {functions} FROM PUBLIC")
        tconn.execute(f"GRANT EXECUTE ON FUNCTION {functions} TO pg_database_owner")
    return True
