"""The `snapshots` table: one row per pg_dump of a project."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb


@dataclass(frozen=True)
class Snapshot:
    id: uuid.UUID
    tenant_id: uuid.UUID
    owner_id: uuid.UUID | None
    operation_id: uuid.UUID | None
    reason: str
    status: str
    server_name: str | None
    source_region: str | None
    storage_region: str
    path: str
    size_bytes: int | None
    sha256: str | None
    pg_version: str | None
    tables: dict[str, Any] | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None


_SELECT = (
    "SELECT id, tenant_id, owner_id, operation_id, reason, status, server_name, source_region, "
    "storage_region, path, size_bytes, sha256, pg_version, tables, error, created_at, "
    "finished_at FROM snapshots"
)


def insert(
    conn: psycopg.Connection[Any],
    *,
    snapshot_id: uuid.UUID,
    tenant_id: uuid.UUID,
    owner_id: uuid.UUID | None,
    reason: str,
    server_name: str | None,
    source_region: str | None,
    storage_region: str,
    path: str,
) -> None:
    conn.execute(
        "INSERT INTO snapshots (id, tenant_id, owner_id, reason, server_name, source_region, "
        "storage_region, path) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (
            snapshot_id,
            tenant_id,
            owner_id,
            reason,
            server_name,
            source_region,
            storage_region,
            path,
        ),
    )


def set_operation(conn: psycopg.Connection[Any], snapshot_id: uuid.UUID, op_id: uuid.UUID) -> None:
    conn.execute("UPDATE snapshots SET operation_id = %s WHERE id = %s", (op_id, snapshot_id))


def get(conn: psycopg.Connection[Any], snapshot_id: uuid.UUID) -> Snapshot | None:
    with conn.cursor(row_factory=class_row(Snapshot)) as cur:
        return cur.execute(_SELECT + " WHERE id = %s", (snapshot_id,)).fetchone()


def of_tenant(
    conn: psycopg.Connection[Any], tenant_id: uuid.UUID, *, statuses: tuple[str, ...]
) -> list[Snapshot]:
    with conn.cursor(row_factory=class_row(Snapshot)) as cur:
        return cur.execute(
            _SELECT + " WHERE tenant_id = %s AND status = ANY(%s) ORDER BY created_at DESC, id",
            (tenant_id, list(statuses)),
        ).fetchall()


def finish(
    conn: psycopg.Connection[Any],
    snapshot_id: uuid.UUID,
    *,
    size_bytes: int,
    sha256: str,
    pg_version: str,
    tables: dict[str, Any],
) -> None:
    conn.execute(
        "UPDATE snapshots SET status = 'ok', size_bytes = %s, sha256 = %s, pg_version = %s, "
        "tables = %s, error = NULL, finished_at = now() WHERE id = %s",
        (size_bytes, sha256, pg_version, Jsonb(tables), snapshot_id),
    )


def fail(conn: psycopg.Connection[Any], snapshot_id: uuid.UUID, error: str) -> None:
    conn.execute(
        "UPDATE snapshots SET status = 'failed', error = %s, finished_at = now() "
        "WHERE id = %s AND status = 'running'",
        (error[:500], snapshot_id),
    )


def expire(conn: psycopg.Connection[Any], snapshot_id: uuid.UUID) -> None:
    conn.execute(
        "UPDATE snapshots SET status = 'expired', finished_at = coalesce(finished_at, now()) "
        "WHERE id = %s",
        (snapshot_id,),
    )


def latest_scheduled(conn: psycopg.Connection[Any]) -> dict[uuid.UUID, datetime]:
    """Per project, when its newest usable or running snapshot was taken."""
    rows = conn.execute(
        "SELECT tenant_id, max(created_at) FROM snapshots "
        "WHERE status IN ('ok', 'running') GROUP BY tenant_id"
    ).fetchall()
    return {r[0]: r[1] for r in rows}
