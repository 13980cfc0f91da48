"""Spare databases: CREATE DATABASE copies a template and waits for its files
and WAL to reach the disk, most of a provision's time. Each server keeps a
few empty databases ready (`pgfleet_spare_*`, made by the workers off the
request path); provisioning renames one, which is a catalog change. Nobody
can log in to a spare (pg_hba admits a tenant role only to its own
database), and it gets the project's owner and ACL right after.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import psycopg
from psycopg import sql

from pgfleet.errors import RegionUnavailable
from pgfleet.operations.registry import REGISTRY
from pgfleet.platform.core import Platform
from pgfleet.tenants.template import ensure_template

log = logging.getLogger(__name__)
# PostgreSQL marks a database whose DROP was interrupted with this datconnlimit
# (DATCONNLIMIT_INVALID_DB); it can only be dropped.
INVALID_DB_CONNLIMIT = -2

SPARE_PREFIX = "pgfleet_spare_"


_SPARE_LOCK = 0x7370617265  # "spare": one refiller per server at a time


def claim_spare(conn: psycopg.Connection[Any], name: str) -> bool:
    """Rename a spare database to `name`, if the server has one.

    CREATE DATABASE copies a template and waits for its files and WAL to
    reach the disk: most of a provision's time. Spares are made ahead of time
    by the workers (`refill_spares`), off the request path; renaming one is a
    catalog change. Nobody can log in to a spare (pg_hba admits a tenant role
    only to its own database), and it gets the project's owner and ACL right
    after, in the same step."""
    spares = conn.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE %s AND datallowconn "
        "AND datconnlimit <> %s ORDER BY datname LIMIT 4",
        (SPARE_PREFIX.replace("_", "\\_") + "%", INVALID_DB_CONNLIMIT),
    ).fetchall()
    for (spare,) in spares:
        try:
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(spare), sql.Identifier(name)
                )
            )
            return True
        except (
            psycopg.errors.InvalidCatalogName,  # another worker took it
            psycopg.errors.ObjectInUse,  # someone is connected to it
            psycopg.errors.DuplicateDatabase,  # `name` appeared meanwhile
        ):
            continue
    return False


def refill_spares(conn: psycopg.Connection[Any], target: int) -> int:
    """Bring the server's spare databases up to `target`; returns how many
    were made. One refiller per server at a time (advisory lock)."""
    got = conn.execute("SELECT pg_try_advisory_lock(%s)", (_SPARE_LOCK,)).fetchone()
    if not (got and got[0]):
        return 0
    made = 0
    try:
        row = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname LIKE %s",
            (SPARE_PREFIX.replace("_", "\\_") + "%",),
        ).fetchone()
        for _ in range(target - (int(row[0]) if row else 0)):
            spare = SPARE_PREFIX + uuid.uuid4().hex
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(spare)))
            made += 1
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_SPARE_LOCK,))
    return made


@REGISTRY.every("refill_spares", lambda s: s.worker_heartbeat_s)
def refill_all(platform: Platform) -> None:
    """Every server's spares back up to PGFLEET_SPARE_DATABASES."""
    target = platform.settings.spare_databases
    if not target:
        return
    for server in platform.servers.all(enabled_only=True):
        try:
            with platform.servers.admin_connection(server) as conn:
                ensure_template(platform, server, conn)
                refill_spares(conn, target)
        except (RegionUnavailable, psycopg.Error) as e:
            log.debug("spares for %s not refilled: %s", server.name, e)
