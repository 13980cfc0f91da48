"""Operations, their steps and the audit log in the platform DB."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb

from pgfleet.errors import Conflict, OperationNotFound

STATUSES = ("scheduled", "running", "finished", "failed", "cancelled")
UNFINISHED = ("scheduled", "running")
ENDED = ("finished", "failed", "cancelled")
NOTIFY_CHANNEL = "pgfleet_operations"

# The columns of an Operation, in the order of its fields.
OPERATION_COLUMNS = sql.SQL(
    "id, tenant_id, owner_id, type, status, params, result, current_step, "
    "attempts, error, actor, worker, cancel_requested, deadline, "
    "deadline_missed, created_at, started_at, finished_at"
)
_SELECT_OPS = sql.SQL("SELECT {} FROM operations o").format(OPERATION_COLUMNS)


@dataclass(frozen=True, slots=True)
class Step:
    """One step of an operation, as `operation_steps` holds it."""

    position: int
    name: str
    status: str
    attempts: int
    error: str | None
    started_at: datetime
    finished_at: datetime | None
    duration_ms: float | None


@dataclass(frozen=True, slots=True)
class Operation:
    """One row of `operations` (with its steps, when read one at a time)."""

    id: uuid.UUID
    tenant_id: uuid.UUID | None
    owner_id: uuid.UUID | None
    type: str
    status: str
    params: dict[str, Any]
    result: dict[str, Any] | None
    current_step: str | None
    attempts: int
    error: str | None
    actor: str | None
    worker: str | None
    cancel_requested: bool
    deadline: datetime
    deadline_missed: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    steps: tuple[Step, ...] = ()

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def duration_ms(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return round((self.finished_at - self.started_at).total_seconds() * 1000, 1)


# The row columns, in the dataclass's order (`steps` is not a column).
_OP_NAMES = [f.name for f in dataclasses.fields(Operation) if f.name != "steps"]


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
    # ON CONFLICT rather than a savepoint to catch the unique violation in
    # (two round trips fewer on every operation's start), aimed at the
    # one-unfinished-operation-per-project index only: any other conflict
    # still raises.
    inserted = conn.execute(
        "INSERT INTO operations (id, tenant_id, owner_id, type, params, actor, deadline) "
        "VALUES (%s, %s, %s, %s, %s, %s, now() + %s) "
        "ON CONFLICT (tenant_id) WHERE status IN ('scheduled', 'running') DO NOTHING "
        "RETURNING id",
        (
            op_id,
            tenant_id,
            owner_id,
            type,
            Jsonb(params),
            actor,
            timedelta(seconds=deadline_s),
        ),
    ).fetchone()
    if inserted is None:
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
        )
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


_GET_OPERATION = sql.SQL(
    "SELECT {}, s.position, s.name, s.status, s.attempts, s.error, s.started_at, "
    "s.finished_at, "
    "CASE WHEN s.status <> 'skipped' THEN "
    "round(extract(epoch FROM s.finished_at - s.started_at) * 1000, 1)::float8 END "
    "FROM operations o LEFT JOIN operation_steps s ON s.operation_id = o.id "
    "WHERE o.id = %s ORDER BY s.position"
).format(sql.SQL(", ").join(sql.SQL("o.") + sql.Identifier(name) for name in _OP_NAMES))


def get_operation(conn: psycopg.Connection[Any], op_id: uuid.UUID | str) -> Operation:
    """One operation with its steps, in one round trip (a row per step)."""
    try:
        oid = uuid.UUID(str(op_id))
    except ValueError:
        raise OperationNotFound(f"operation {op_id} not found") from None
    rows = conn.execute(_GET_OPERATION, (oid,)).fetchall()
    if not rows:
        raise OperationNotFound(f"operation {op_id} not found")
    n = len(_OP_NAMES)
    steps = tuple(Step(*r[n:]) for r in rows if r[n] is not None)
    return Operation(**dict(zip(_OP_NAMES, rows[0][:n], strict=True)), steps=steps)


def list_operations(
    conn: psycopg.Connection[Any],
    *,
    tenant_id: uuid.UUID | None = None,
    owner_id: uuid.UUID | None = None,
    status: str | None = None,
    limit: int = 50,
) -> list[Operation]:
    clauses: list[sql.Composable] = [sql.SQL("true")]
    params: list[Any] = []
    for column, value in (("tenant_id", tenant_id), ("owner_id", owner_id), ("status", status)):
        if value is not None:
            clauses.append(sql.SQL("o.{} = %s").format(sql.Identifier(column)))
            params.append(value)
    query = sql.SQL("{} WHERE {} ORDER BY o.created_at DESC, o.id LIMIT %s").format(
        _SELECT_OPS, sql.SQL(" AND ").join(clauses)
    )
    with conn.cursor(row_factory=class_row(Operation)) as cur:
        return cur.execute(query, (*params, limit)).fetchall()


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
