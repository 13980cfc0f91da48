"""Operations, their steps and the audit log in the platform DB."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgfleet.errors import Conflict, OperationNotFound

STATUSES = ("scheduled", "running", "finished", "failed", "cancelled")
UNFINISHED = ("scheduled", "running")
NOTIFY_CHANNEL = "pgfleet_operations"

_OP_COLUMNS = sql.SQL(
    "o.id, o.tenant_id, o.owner_id, o.type, o.status, o.params, o.result, o.current_step, "
    "o.attempts, o.error, o.actor, o.worker, o.cancel_requested, o.deadline, "
    "o.deadline_missed, o.created_at, o.started_at, o.finished_at"
)
_SELECT_OPS = sql.SQL("SELECT {} FROM operations o").format(_OP_COLUMNS)


def insert_operation(
    conn: psycopg.Connection[Any],
    *,
    type: str,
    tenant_id: uuid.UUID | None,
    owner_id: uuid.UUID | None,
    actor: str,
    params: dict[str, Any],
    deadline_s: float,
) -> uuid.UUID:
    """Record an operation as `scheduled`, inside the caller's transaction.

    A project runs one operation at a time: a second one is refused with
    409 naming the one in progress (a unique index decides, so two API
    processes cannot both start one).
    """
    op_id = uuid.uuid4()
    try:
        with conn.transaction():
            conn.execute(
                "INSERT INTO operations (id, tenant_id, owner_id, type, params, actor, deadline) "
                "VALUES (%s, %s, %s, %s, %s, %s, now() + %s)",
                (
                    op_id,
                    tenant_id,
                    owner_id,
                    type,
                    Jsonb(params),
                    actor,
                    timedelta(seconds=deadline_s),
                ),
            )
    except psycopg.errors.UniqueViolation:
        running = conn.execute(
            "SELECT id, type, status FROM operations WHERE tenant_id = %s "
            "AND status IN ('scheduled', 'running')",
            (tenant_id,),
        ).fetchone()
        if running is None:  # it finished meanwhile
            return insert_operation(
                conn,
                type=type,
                tenant_id=tenant_id,
                owner_id=owner_id,
                actor=actor,
                params=params,
                deadline_s=deadline_s,
            )
        raise Conflict(
            f"project {tenant_id} already has operation {running[0]} ({running[1]}, "
            f"{running[2]}); operations on one project run one at a time",
            operation_id=str(running[0]),
            operation_type=running[1],
            operation_status=running[2],
        ) from None
    return op_id


def audit(
    conn: psycopg.Connection[Any],
    *,
    actor: str,
    action: str,
    owner_id: uuid.UUID | None = None,
    tenant_id: uuid.UUID | None = None,
    operation_id: uuid.UUID | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """One audit row: who did what to which project. Never holds secrets."""
    conn.execute(
        "INSERT INTO audit_log (owner_id, actor, action, tenant_id, operation_id, details) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        (owner_id, actor, action, tenant_id, operation_id, Jsonb(details or {})),
    )


def get_operation(conn: psycopg.Connection[Any], op_id: uuid.UUID | str) -> dict[str, Any]:
    try:
        oid = uuid.UUID(str(op_id))
    except ValueError:
        raise OperationNotFound(f"operation {op_id} not found") from None
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(sql.SQL("{} WHERE o.id = %s").format(_SELECT_OPS), (oid,)).fetchone()
        if row is None:
            raise OperationNotFound(f"operation {op_id} not found")
        row["steps"] = cur.execute(
            "SELECT position, name, status, attempts, error, started_at, finished_at, "
            "round(extract(epoch FROM finished_at - started_at) * 1000, 1)::float8 AS duration_ms "
            "FROM operation_steps WHERE operation_id = %s ORDER BY position",
            (oid,),
        ).fetchall()
    return _with_duration(row)


def _with_duration(row: dict[str, Any]) -> dict[str, Any]:
    start, end = row.get("started_at"), row.get("finished_at")
    row["duration_ms"] = (
        round((end - start).total_seconds() * 1000, 1) if start is not None and end else None
    )
    return row


def list_operations(
    conn: psycopg.Connection[Any],
    *,
    tenant_id: uuid.UUID | None = None,
    owner_id: uuid.UUID | None = None,
    status: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    clauses: list[sql.Composable] = [sql.SQL("true")]
    params: list[Any] = []
    for column, value in (("tenant_id", tenant_id), ("owner_id", owner_id), ("status", status)):
        if value is not None:
            clauses.append(sql.SQL("o.{} = %s").format(sql.Identifier(column)))
            params.append(value)
    query = sql.SQL("{} WHERE {} ORDER BY o.created_at DESC, o.id LIMIT %s").format(
        _SELECT_OPS, sql.SQL(" AND ").join(clauses)
    )
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query, (*params, limit)).fetchall()
    return [_with_duration(r) for r in rows]


def list_audit(
    conn: psycopg.Connection[Any],
    *,
    tenant_id: uuid.UUID | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT id, at, owner_id, actor, action, tenant_id, operation_id, details "
            "FROM audit_log WHERE %(t)s::uuid IS NULL OR tenant_id = %(t)s "
            "ORDER BY at DESC, id DESC LIMIT %(n)s",
            {"t": tenant_id, "n": limit},
        ).fetchall()


def deadline_summary(conn: psycopg.Connection[Any], alive_within_s: float = 60.0) -> dict[str, Any]:
    """Unfinished operations, those past their deadline, and the workers whose
    heartbeat is at most `alive_within_s` old (for /health, status)."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "SELECT count(*) FILTER (WHERE status = 'scheduled') AS scheduled, "
            "count(*) FILTER (WHERE status = 'running') AS running, "
            "count(*) FILTER (WHERE deadline < now()) AS past_deadline "
            "FROM operations WHERE status IN ('scheduled', 'running')"
        ).fetchone()
        assert row is not None
        row["missed"] = cur.execute(
            "SELECT id, type, tenant_id, status, current_step, deadline FROM operations "
            "WHERE status IN ('scheduled', 'running') AND deadline < now() "
            "ORDER BY deadline LIMIT 20"
        ).fetchall()
        workers = cur.execute(
            "SELECT count(*) AS n FROM procrastinate_workers "
            "WHERE last_heartbeat > now() - make_interval(secs => %s)",
            (alive_within_s,),
        ).fetchone()
        row["workers"] = workers["n"] if workers else 0
    return row
