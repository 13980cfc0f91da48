"""The `tenants` table: its SQL lives here, rows come back typed.

The seed's columns (id, name, subdomain, region, plan_type, status,
connection_info, created_at, updated_at) plus pgfleet's (owner, placement,
error, timestamps). `status` is checked by the database (migration 0009) and
changed only through `transition()`, which knows which changes are allowed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from pgfleet.errors import Conflict

Status = Literal["provisioning", "active", "paused", "failed", "deleting", "deleted"]
STATUSES: tuple[Status, ...] = (
    "provisioning",
    "active",
    "paused",
    "failed",
    "deleting",
    "deleted",
)
# Statuses whose database may exist on a server (the reconciler's "live").
LIVE: tuple[Status, ...] = ("active", "paused", "provisioning", "failed", "deleting")
# For each status, the statuses a project may reach it from. Setting the
# status it already has is always allowed (steps run again after a crash).
ALLOWED_FROM: dict[Status, tuple[Status, ...]] = {
    # only a cancelled delete puts a project back to provisioning
    "provisioning": ("deleting",),
    # provisioned; resumed; a cancelled delete or pause put back; a failed
    # project converged again by the reconciler
    "active": ("provisioning", "paused", "deleting", "failed"),
    "paused": ("active", "deleting", "provisioning"),
    "failed": ("provisioning", "active", "paused", "deleting"),
    "deleting": ("active", "paused", "failed", "provisioning"),
    "deleted": ("provisioning", "deleting", "failed"),
}


@dataclass(frozen=True)
class Tenant:
    """One row of `tenants` (`server` is the hosting server's name)."""

    id: uuid.UUID
    name: str
    subdomain: str | None
    region: str | None
    plan_type: str | None
    status: str
    owner_id: uuid.UUID | None
    server_id: int | None
    server: str | None
    hosted_region: str | None
    placement_reason: str | None
    error: str | None
    connection_info: dict[str, Any] | None
    created_at: datetime | None
    updated_at: datetime | None
    deleted_at: datetime | None
    paused_at: datetime | None
    # The data-residency rule (eu, us, apac) or None.
    residency: str | None = None
    # What a restored project was restored from (project, snapshot or time).
    restored_from: dict[str, Any] | None = None

    @property
    def info(self) -> dict[str, Any]:
        return self.connection_info or {}


# A Tenant's columns, from `t` (a tenants row) and `s` (its server).
_COLUMNS = sql.SQL(
    "t.id, t.name, t.subdomain, t.region, t.plan_type, t.status, t.owner_id, "
    "t.server_id, s.name AS server, t.hosted_region, t.placement_reason, t.error, "
    "t.connection_info, t.created_at, t.updated_at, t.deleted_at, t.paused_at, "
    "t.residency, t.restored_from"
)
_SELECT = sql.SQL("SELECT {} FROM tenants t LEFT JOIN servers s ON s.id = t.server_id").format(
    _COLUMNS
)
# A new row, read back with its server's name in the same statement.
_INSERT = sql.SQL(
    """
    WITH t AS (
        INSERT INTO tenants (id, name, subdomain, region, plan_type, status, owner_id,
                             server_id, hosted_region, placement_reason, connection_info,
                             residency, restored_from)
        VALUES (%s, %s, %s, %s, %s, 'provisioning', %s, %s, %s, %s, %s, %s, %s)
        RETURNING *
    )
    SELECT {} FROM t LEFT JOIN servers s ON s.id = t.server_id
    """
).format(_COLUMNS)


def get(
    conn: psycopg.Connection[Any], tenant_id: uuid.UUID, *, for_update: bool = False
) -> Tenant | None:
    query = sql.SQL("{} WHERE t.id = %s{}").format(
        _SELECT, sql.SQL(" FOR UPDATE OF t" if for_update else "")
    )
    with conn.cursor(row_factory=class_row(Tenant)) as cur:
        return cur.execute(query, (tenant_id,)).fetchone()


def require(conn: psycopg.Connection[Any], tenant_id: uuid.UUID) -> Tenant:
    """The row of a project an operation works on (it cannot vanish: rows
    are kept as `deleted`)."""
    row = get(conn, tenant_id)
    assert row is not None, f"tenant {tenant_id} vanished"
    return row


def listing(
    conn: psycopg.Connection[Any],
    *,
    owner_id: uuid.UUID | None = None,
    region: str | None = None,
    include_deleted: bool = False,
) -> list[Tenant]:
    clauses: list[sql.Composable] = [sql.SQL("true")]
    params: list[Any] = []
    if owner_id is not None:
        clauses.append(sql.SQL("t.owner_id = %s"))
        params.append(owner_id)
    if region is not None:
        clauses.append(sql.SQL("t.region = %s"))
        params.append(region)
    if not include_deleted:
        clauses.append(sql.SQL("t.status <> 'deleted'"))
    query = sql.SQL("{} WHERE {} ORDER BY t.created_at DESC, t.id").format(
        _SELECT, sql.SQL(" AND ").join(clauses)
    )
    with conn.cursor(row_factory=class_row(Tenant)) as cur:
        return cur.execute(query, params).fetchall()


def all_for_reconcile(conn: psycopg.Connection[Any], expiry_job: str) -> list[dict[str, Any]]:
    """Every project with what the reconciler needs: whether an operation is
    in flight, for a provisioning one how the operation that made it (a
    create, or a restore into a new project) ended, and whether an expiry
    job waits for it."""
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            "SELECT t.id, t.status, t.server_id, t.region, t.plan_type, t.connection_info, "
            "EXISTS (SELECT 1 FROM operations o WHERE o.tenant_id = t.id "
            "AND o.status IN ('scheduled', 'running')) AS busy, "
            # Only a provisioning project's: the others' would read through
            # every operation they ever had (the one that made them is the
            # oldest).
            "CASE WHEN t.status = 'provisioning' THEN (SELECT o.status FROM operations o "
            "WHERE o.tenant_id = t.id AND o.type IN ('provision', 'restore') "
            "ORDER BY o.created_at DESC LIMIT 1) END AS made_by, "
            "EXISTS (SELECT 1 FROM procrastinate_jobs j WHERE j.task_name = %s "
            "AND j.status IN ('todo', 'doing') AND j.args->>'tenant_id' = t.id::text) "
            "AS expiry_pending FROM tenants t",
            (expiry_job,),
        ).fetchall()


def fail_given_up(conn: psycopg.Connection[Any], tenant_id: uuid.UUID, error: str) -> bool:
    """Mark a project `failed` if it is still `provisioning` with no
    operation in flight (one may have started since the reconciler looked).
    Whether it was."""
    cur = conn.execute(
        "UPDATE tenants t SET status = 'failed', error = %s, updated_at = now() "
        "WHERE t.id = %s AND t.status = 'provisioning' AND NOT EXISTS (SELECT 1 FROM "
        "operations o WHERE o.tenant_id = t.id AND o.status IN ('scheduled', 'running'))",
        (error, tenant_id),
    )
    return cur.rowcount == 1


def insert(
    conn: psycopg.Connection[Any],
    *,
    tenant_id: uuid.UUID,
    name: str,
    subdomain: str,
    region: str,
    plan: str,
    owner_id: uuid.UUID,
    server_id: int,
    hosted_region: str,
    placement_reason: str,
    connection_info: dict[str, Any] | None = None,
    residency: str | None = None,
    restored_from: dict[str, Any] | None = None,
) -> Tenant:
    """A new project's row, `provisioning`, as inserted (read in the same
    statement); a taken subdomain is 409. Inside the caller's transaction,
    which the 409 ends: no savepoint (two round trips) around it."""
    try:
        with conn.cursor(row_factory=class_row(Tenant)) as cur:
            row = cur.execute(
                _INSERT,
                (
                    tenant_id,
                    name,
                    subdomain,
                    region,
                    plan,
                    owner_id,
                    server_id,
                    hosted_region,
                    placement_reason,
                    Jsonb(connection_info or {}),
                    residency,
                    Jsonb(restored_from) if restored_from is not None else None,
                ),
            ).fetchone()
    except psycopg.errors.UniqueViolation:
        raise Conflict(f"subdomain {subdomain!r} is already taken", field="subdomain") from None
    assert row is not None, "an INSERT without a conflict clause returns its row"
    return row


_OWNER_LOCK_CLASS = 0x6F776E72  # "ownr"


def count_live_of_owner(conn: psycopg.Connection[Any], owner_id: uuid.UUID) -> int:
    """The owner's projects that are not deleted, counted under a lock that
    serialises this count per owner until the caller's transaction ends (so
    two creates at once cannot both pass a quota)."""
    # The two-key form: a lock space of its own (`owner` as the class id).
    conn.execute(
        "SELECT pg_advisory_xact_lock(%s::int4, hashtext(%s))", (_OWNER_LOCK_CLASS, str(owner_id))
    )
    row = conn.execute(
        "SELECT count(*) FROM tenants WHERE owner_id = %s AND status <> 'deleted'", (owner_id,)
    ).fetchone()
    return int(row[0]) if row else 0


def transition(
    conn: psycopg.Connection[Any],
    tenant_id: uuid.UUID,
    to: Status,
    *,
    error: str | None = None,
    paused: bool | None = None,
    deleted: bool = False,
) -> str:
    """Move a project to status `to` if its current status allows it (see
    ALLOWED_FROM); returns the status it had. `error` is recorded (or
    cleared with ""), `paused` sets or clears paused_at, `deleted` stamps
    deleted_at and drops the connection info (nothing secret is kept for a
    deleted project). A transition that is not allowed is 409."""
    sets: list[sql.Composable] = [sql.SQL("status = %(to)s"), sql.SQL("updated_at = now()")]
    if error is not None:
        sets.append(sql.SQL("error = nullif(%(error)s, '')"))
    if paused is True:
        sets.append(sql.SQL("paused_at = coalesce(paused_at, now())"))
    elif paused is False:
        sets.append(sql.SQL("paused_at = NULL"))
    if deleted:
        sets.append(sql.SQL("deleted_at = coalesce(deleted_at, now())"))
        sets.append(sql.SQL("connection_info = NULL"))
    with conn.transaction():
        old = lock_row_status(conn, tenant_id)
        if old != to and old not in ALLOWED_FROM[to]:
            raise Conflict(f"project {tenant_id} is {old}; it cannot become {to}", status=old)
        conn.execute(
            sql.SQL("UPDATE tenants SET {} WHERE id = %(id)s").format(sql.SQL(", ").join(sets)),
            {"id": tenant_id, "to": to, "error": error},
        )
    return old


def activate(
    conn: psycopg.Connection[Any], tenant_id: uuid.UUID, info: dict[str, Any], hosted: str
) -> None:
    """A provisioned project: its connection info, and status `active` (a
    paused project stays paused; a deleted one is left alone)."""
    conn.execute(
        "UPDATE tenants SET status = CASE WHEN status = 'paused' THEN 'paused' "
        "ELSE 'active' END, connection_info = %s, error = NULL, "
        "hosted_region = %s, updated_at = now() WHERE id = %s AND status <> 'deleted'",
        (Jsonb(info), hosted, tenant_id),
    )


def set_connection_info(
    conn: psycopg.Connection[Any], tenant_id: uuid.UUID, info: dict[str, Any]
) -> None:
    conn.execute(
        "UPDATE tenants SET connection_info = %s, updated_at = now() WHERE id = %s",
        (Jsonb(info), tenant_id),
    )


def set_placement(
    conn: psycopg.Connection[Any],
    tenant_id: uuid.UUID,
    *,
    server_id: int,
    hosted_region: str,
    reason: str,
) -> None:
    conn.execute(
        "UPDATE tenants SET server_id = %s, hosted_region = %s, placement_reason = %s, "
        "updated_at = now() WHERE id = %s",
        (server_id, hosted_region, reason, tenant_id),
    )


def set_plan(conn: psycopg.Connection[Any], tenant_id: uuid.UUID, plan: str) -> None:
    conn.execute(
        "UPDATE tenants SET plan_type = %s, updated_at = now() WHERE id = %s", (plan, tenant_id)
    )


def plan_of(conn: psycopg.Connection[Any], tenant_id: uuid.UUID) -> str | None:
    row = conn.execute("SELECT plan_type FROM tenants WHERE id = %s", (tenant_id,)).fetchone()
    return row[0] if row else None


def follow_servers(conn: psycopg.Connection[Any]) -> int:
    """What projects were handed (host, port, TLS) follows their server's
    record when it changed (pgfleet up after a server moved or got TLS).
    Returns how many projects changed."""
    cur = conn.execute(
        """
        UPDATE tenants t SET connection_info = t.connection_info
          || jsonb_build_object('host', s.host, 'port', s.port, 'sslmode', s.sslmode,
                                'sslrootcert', s.sslrootcert)
        FROM servers s
        WHERE t.server_id = s.id AND t.connection_info IS NOT NULL
          AND (t.connection_info->>'host' IS DISTINCT FROM s.host
               OR (t.connection_info->>'port')::int IS DISTINCT FROM s.port
               OR t.connection_info->>'sslmode' IS DISTINCT FROM s.sslmode
               OR t.connection_info->>'sslrootcert' IS DISTINCT FROM s.sslrootcert)
        """
    )
    return cur.rowcount


def lock_row_status(conn: psycopg.Connection[Any], tenant_id: uuid.UUID) -> str:
    """The project's status, its row locked for the caller's transaction
    ("deleted" if there is no row)."""
    row = conn.execute(
        "SELECT status FROM tenants WHERE id = %s FOR UPDATE", (tenant_id,)
    ).fetchone()
    return str(row[0]) if row else "deleted"
