"""Starting, reading and cancelling operations on behalf of an owner."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgfleet.errors import Conflict, OperationFailed, OperationNotFound
from pgfleet.operations.registry import REGISTRY
from pgfleet.operations.runtime import OperationsRuntime
from pgfleet.operations.store import (
    NOTIFY_CHANNEL,
    Operation,
    audit,
    get_operation,
    insert_operation,
    list_operations,
)
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner


def operation_failed(op: Operation) -> OperationFailed:
    """The error an operation that failed or was cancelled answers with."""
    result = op.result or {}
    if op.status == "cancelled":
        status, code = 409, "operation_cancelled"
    else:
        status = int(result.get("error_status", 500))
        code = str(result.get("error_code", "operation_failed"))
    return OperationFailed(
        f"{op.type} operation {op.id} {op.status}: {op.error or 'no error text'}",
        status_code=status,
        code=code,
        operation_id=str(op.id),
        **({"region": result["error_region"]} if result.get("error_region") else {}),
    )


def actor_of(owner: Owner) -> str:
    return owner.actor


def start_operation(
    platform: Platform,
    owner: Owner,
    *,
    type: str,
    tenant_id: uuid.UUID | None,
    tenant_owner: uuid.UUID | None,
    action: str,
    params: dict[str, Any] | None = None,
    details: dict[str, Any] | None = None,
    prepare: Callable[[psycopg.Connection[Any]], uuid.UUID | None] | None = None,
    deadline_s: float | None = None,
) -> uuid.UUID:
    """Record intent (optional `prepare`, the operation, an audit row) in one
    transaction, then queue the operation. A `prepare` that returns an id
    names the operation's subject (one it chose in that transaction)."""
    if type not in REGISTRY.kinds:
        raise ValueError(f"unknown operation type {type!r}")
    with platform.db.connection() as conn, conn.transaction():
        if prepare is not None:
            tenant_id = prepare(conn) or tenant_id
        op_id = insert_operation(
            conn,
            type=type,
            tenant_id=tenant_id,
            owner_id=tenant_owner,
            actor=actor_of(owner),
            params=params or {},
            deadline_s=deadline_s or platform.settings.operation_deadline_s,
        )
        audit(
            conn,
            actor=actor_of(owner),
            owner_id=owner.id,
            action=action,
            tenant_id=tenant_id,
            operation_id=op_id,
            details={**(params or {}), **(details or {})},
        )
    OperationsRuntime.of(platform).submit(op_id)
    return op_id


def visible_operation(platform: Platform, owner: Owner, op_id: str | uuid.UUID) -> Operation:
    with platform.db.connection() as conn:
        op = get_operation(conn, op_id)
    if not owner.is_admin and op.owner_id != owner.id:
        raise OperationNotFound(f"operation {op_id} not found")
    return op


def project_operations(
    platform: Platform, tenant_id: uuid.UUID, *, limit: int = 50
) -> list[Operation]:
    with platform.db.connection() as conn:
        return list_operations(conn, tenant_id=tenant_id, limit=limit)


def owner_operations(
    platform: Platform, owner: Owner, *, status: str | None = None, limit: int = 50
) -> list[Operation]:
    with platform.db.connection() as conn:
        return list_operations(
            conn, owner_id=None if owner.is_admin else owner.id, status=status, limit=limit
        )


def cancel_operation(platform: Platform, owner: Owner, op_id: str) -> Operation:
    """Cancel a scheduled or running operation.

    A scheduled one that has not started ends at once. A running one is
    asked to stop; its worker stops at the next step boundary and undoes what
    it did, unless the operation is past its point of no return (409).
    """
    op = visible_operation(platform, owner, op_id)
    kind = REGISTRY.kinds[op.type]
    job_to_cancel = None
    with platform.db.connection() as conn, conn.transaction():
        with conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "SELECT status, current_step, job_id, tenant_id, type FROM operations "
                "WHERE id = %s FOR UPDATE",
                (op.id,),
            ).fetchone()
            assert row is not None
            started = cur.execute(
                "SELECT max(position) AS p FROM operation_steps WHERE operation_id = %s",
                (op.id,),
            ).fetchone()
        status = row["status"]
        if status not in ("scheduled", "running"):
            raise Conflict(
                f"operation {op.id} is already {status}; only scheduled or running "
                "operations can be cancelled",
                status=status,
            )
        last = started["p"] if started and started["p"] is not None else None
        if last is None and status == "scheduled":
            conn.execute(
                "UPDATE operations SET status = 'cancelled', cancel_requested = true, "
                "finished_at = now(), updated_at = now(), error = 'cancelled before it started' "
                "WHERE id = %s",
                (op.id,),
            )
            if kind.on_cancel_unstarted is not None and row["tenant_id"] is not None:
                kind.on_cancel_unstarted(conn, row["tenant_id"])
            conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(op.id)))
            job_to_cancel = row["job_id"]
        else:
            position = last if last is not None else 0
            if not kind.cancellable_before(position + 1):
                final = next(s.name for s in kind.steps if s.final)
                raise Conflict(
                    f"operation {op.id} has started step {final!r}, its point of no "
                    "return; it can no longer be cancelled",
                    status=status,
                    current_step=row["current_step"],
                )
            conn.execute(
                "UPDATE operations SET cancel_requested = true, updated_at = now() WHERE id = %s",
                (op.id,),
            )
        audit(
            conn,
            actor=actor_of(owner),
            owner_id=owner.id,
            action="operation.cancel",
            tenant_id=row["tenant_id"],
            operation_id=op.id,
            details={"type": row["type"], "status_before": status},
        )
    if job_to_cancel is not None:
        OperationsRuntime.of(platform).dispatcher.cancel_job(job_to_cancel)
    return visible_operation(platform, owner, op.id)


def wait(platform: Platform, op_id: uuid.UUID) -> Operation:
    """The operation once it ended, or as it is after PGFLEET_OPERATION_WAIT_S."""
    return OperationsRuntime.of(platform).wait(op_id, platform.settings.operation_wait_s)


def wait_or_raise(platform: Platform, op_id: uuid.UUID) -> Operation:
    """Wait for an operation (up to the configured wait); raise its error if
    it failed or was cancelled."""
    op = wait(platform, op_id)
    if op.status in ("failed", "cancelled"):
        raise operation_failed(op)
    return op
