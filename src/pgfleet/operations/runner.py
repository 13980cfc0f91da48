"""Executing one operation: its steps in order, each recorded, each safe to
run again.

Rules:
- One executor per operation: a session advisory lock on the operation,
  taken on a platform connection, decides (a second worker that gets the
  same job leaves it alone). The lock dies with the executor's connection,
  so a killed worker never keeps it. The executor also holds the project's
  lock, the one `ensure_tenant_database_provisioned` takes, so a repair by
  the reconciler never interleaves with an operation's steps. Before each
  step and retry the executor checks that connection is still there: if it
  broke (a platform DB outage), the locks went with it and the executor
  stops, leaving the operation to whoever takes them next.
- Finished steps are skipped when an operation is resumed; the step that
  was running when a worker died runs again: steps look before they act.
- A step with nothing to do (its `skip` says so) does not run and is
  recorded `skipped`, with the next record: it costs no round trip.
- Each record is one statement: the previous step's end (with the state
  it left), the skipped steps, the flags and the next step's start.
- Transient failures (a regional server or the platform DB unreachable)
  are retried with exponential backoff until the operation's deadline;
  anything else fails the operation at once. A failed or cancelled
  operation runs its kind's compensation, so the project is left consistent.
- Cancelling is honoured between steps, up to a kind's point of no return
  (a step marked `final`, such as dropping a database). Once a final step
  has started, the operation only goes forward: no cancel, and its deadline
  no longer fails it (it is marked `deadline_missed` instead), because
  compensating is no longer possible.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from psycopg_pool import PoolTimeout

from pgfleet.errors import (
    ConnectionLimitReached,
    DeadlineExceeded,
    PgfleetError,
    PlatformUnavailable,
    RegionUnavailable,
)
from pgfleet.operations.failpoints import failpoint
from pgfleet.operations.locks import op_lock_key, resource_lock_key, resource_lock_key_sql
from pgfleet.operations.registry import REGISTRY, Interrupted, OpContext, OperationKind, Step
from pgfleet.operations.store import NOTIFY_CHANNEL, OPERATION_COLUMNS, Operation
from pgfleet.platform.core import Platform

log = logging.getLogger(__name__)

T = TypeVar("T")
TRANSIENT: tuple[type[BaseException], ...] = (
    RegionUnavailable,
    ConnectionLimitReached,  # a tenant's own connections fill its role's limit
    PlatformUnavailable,
    psycopg.OperationalError,
    PoolTimeout,
)
MAX_BACKOFF_S = 5.0


class _Cancelled(Exception):
    pass


def execute_operation(
    platform: Platform,
    op_id: uuid.UUID | str,
    *,
    worker: str,
    hand_off: Callable[[], bool] | None = None,
) -> str:
    """Run (or resume) one operation to its end. Returns its final status,
    "busy" if another executor holds it, "lost" if this one lost its locks,
    or "handed_off" when `hand_off` is given and the operation stopped short
    for a worker to finish (see _Execution)."""
    oid = uuid.UUID(str(op_id))
    with platform.db.connection() as lconn:
        # One round trip: the operation's lock; if taken, its resource's lock
        # too, which domain code that changes the resource outside an
        # operation takes, so the two never interleave (the key is
        # locks.resource_lock_key's, the id's first 8 bytes); and the
        # session's commits made without a WAL flush, for progress records
        # (see _Execution; the records that must flush say so).
        try:
            got = lconn.execute(_TAKE_LOCKS, {"op": op_lock_key(oid), "id": oid}).fetchone()
        except BaseException:
            # A session lock outlives its statement's failure (the resource
            # lock's wait cancelled, a deadlock, an interrupt): the
            # operation's would stay with this pooled connection. Closed,
            # the connection takes whatever it held, and the pool drops it.
            _close(lconn)
            raise
        if not (got and got[0]):
            return "busy"
        locks = [op_lock_key(oid)]
        if got[1] is not None:
            locks.append(resource_lock_key(got[1]))
        try:
            return _Execution(platform, oid, worker, lock_conn=lconn, hand_off=hand_off).run()
        finally:
            # One round trip (several statements in one simple query): RESET,
            # not the value read before, so the connection is back on the
            # server's own setting whatever happened to it since.
            try:
                lconn.execute(
                    sql.SQL("RESET synchronous_commit; SELECT {}").format(
                        sql.SQL(", ").join(
                            sql.SQL("pg_catalog.pg_advisory_unlock({})").format(sql.Literal(k))
                            for k in reversed(locks)
                        )
                    ),
                    prepare=False,
                )
            except BaseException as e:
                _close(lconn)  # gone already, or its locks go with it now
                if not isinstance(e, psycopg.Error):
                    raise


def _close(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(Exception):
        conn.close()


_TAKE_LOCKS = (
    "SELECT got, tenant_id, "  # noqa: S608 (constants)
    "CASE WHEN got THEN pg_catalog.set_config('synchronous_commit', 'off', false) END, "
    "CASE WHEN got AND tenant_id IS NOT NULL THEN pg_catalog.pg_advisory_lock("
    + resource_lock_key_sql("tenant_id")
    + ") END "
    "FROM (SELECT pg_catalog.pg_try_advisory_lock(%(op)s) AS got, "
    "(SELECT tenant_id FROM operations WHERE id = %(id)s) AS tenant_id OFFSET 0) s"
)

# Makes the statement that names it commit with a WAL flush: the setting
# holds until the end of the statement's own transaction, and a commit
# reads it before it is undone. One round trip instead of BEGIN, SET LOCAL,
# the statement and COMMIT.
_DURABLE = "durable AS (SELECT pg_catalog.set_config('synchronous_commit', 'on', true) AS v)"


# A step may start: past the point of no return, or no cancel it must
# honour and the deadline not passed (what _before_step checks).
# A step's row marked running, from the operation row `op` the statement
# updated (no row when the step may not start).
_START_STEP = (
    "INSERT INTO operation_steps (operation_id, position, name, status) "
    "SELECT id, %(pos)s, %(name)s, 'running' FROM op{where} "
    "ON CONFLICT (operation_id, position) DO UPDATE "
    "SET status = 'running', attempts = operation_steps.attempts + 1, "
    "error = NULL, started_at = now(), finished_at = NULL RETURNING 1"
)

# The steps skipped since the last record (Step.skip), recorded with the
# next one: a data-modifying WITH runs whether or not anything reads it.
_SKIPPED = (
    "skipped AS (INSERT INTO operation_steps "
    "(operation_id, position, name, status, started_at, finished_at) "
    "SELECT %(id)s, s.pos, s.name, 'skipped', now(), now() "
    "FROM unnest(%(skip_pos)s::int[], %(skip_names)s::text[]) AS s(pos, name) "
    "ON CONFLICT (operation_id, position) DO UPDATE SET status = 'skipped', "
    "error = NULL, finished_at = now())"
)

_ADVANCE = (  # constants only, hence the noqa
    "WITH {durable}fin AS (UPDATE operation_steps SET status = 'finished', "  # noqa: S608
    "finished_at = now() WHERE operation_id = %(id)s AND position = %(prev)s::int "
    "RETURNING 1), " + _SKIPPED + ", "
    "op AS (UPDATE operations SET result = CASE WHEN %(prev)s::int IS NULL THEN result "
    "ELSE %(state)s END, "
    "current_step = CASE WHEN %(committed)s OR ((NOT %(cancellable)s OR NOT cancel_requested) "
    "AND deadline > now()) THEN %(name)s ELSE current_step END, "
    "updated_at = now() {flushed}WHERE id = %(id)s "
    "RETURNING id, cancel_requested, extract(epoch FROM deadline - now())::float8 AS left_s, "
    "%(committed)s OR ((NOT %(cancellable)s OR NOT cancel_requested) "
    "AND deadline > now()) AS go), "
    "ins AS (" + _START_STEP.format(where=" WHERE go") + ") "
    "SELECT go, cancel_requested, left_s FROM op"
)
# The same, committed with a WAL flush: the start of a final step.
_ADVANCE_DURABLE = _ADVANCE.format(durable=_DURABLE + ", ", flushed="FROM durable ")
_ADVANCE = _ADVANCE.format(durable="", flushed="")


class _LostLocks(Exception):
    """The connection holding the operation's locks is gone: so are they."""


class _HandOff(Exception):
    """An inline executor stops short; a worker finishes the operation."""


class _Execution:
    """One run of an operation, on the connection that holds its locks.

    Every record of progress goes through that connection: if it broke (a
    platform DB outage), the locks went with it, another executor may own
    the operation by now, and this one stops at once (steps look before
    they act, so at most the step running when the link broke overlaps).
    A step's end and the next one's start cost one statement each, without
    a WAL flush: if the platform DB crashes and loses the last of them, the
    steps run again, and steps converge. What steps write about the resource
    itself stays durable, and so do the start of a final step and the
    operation's end.

    With `hand_off` (the API process running an operation it just recorded,
    so that a caller who waits does not pay for the queue), the execution
    stops at the next step boundary or retry once `hand_off()` says so (the
    process is shutting down), leaving the operation `running` for a worker
    to resume; nothing is lost if the process dies instead.
    """

    def __init__(
        self,
        platform: Platform,
        op_id: uuid.UUID,
        worker: str,
        *,
        lock_conn: psycopg.Connection[Any],
        hand_off: Callable[[], bool] | None = None,
    ) -> None:
        self.p = platform
        self.op_id = op_id
        self.worker = worker
        self.committed = False
        self.lock_conn = lock_conn
        self.hand_off = hand_off
        # A step that finished but whose end is recorded with the next
        # step's start (or the operation's end).
        self.unrecorded: int | None = None
        # Steps skipped (Step.skip) since the last record, recorded with the
        # next: (position, name).
        self.skipped: list[tuple[int, str]] = []
        # The step running now (started, not yet returned).
        self.running: int | None = None

    def _recorded(self) -> dict[str, Any]:
        """What the next record writes besides its own: the step that
        finished unrecorded and the steps skipped since. They stay pending
        until a record has written them (_written)."""
        return {
            "id": self.op_id,
            "prev": self.unrecorded,
            "skip_pos": [pos for pos, _ in self.skipped],
            "skip_names": [name for _, name in self.skipped],
        }

    def _written(self) -> None:
        """A record wrote what was pending (see _recorded)."""
        self.unrecorded = None
        self.skipped = []

    def _skips(self, step: Step, ctx: OpContext) -> bool:
        """Whether `step` is skipped. A skip that cannot decide (it failed)
        runs the step: a step looks before it acts, so running it is never
        wrong, while skipping one that had work to do would be."""
        if step.skip is None:
            return False
        try:
            return step.skip(ctx)
        except Exception as e:
            log.warning(
                "operation %s: whether to skip step %s is unknown (%s); running it",
                self.op_id,
                step.name,
                _describe(e),
            )
            return False

    def _q(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run a record on the lock connection; if it broke, the locks are lost."""
        try:
            return fn(self.lock_conn)
        except psycopg.Error as e:
            if self.lock_conn.closed or self.lock_conn.broken:
                raise _LostLocks() from e
            raise

    def _claim(self) -> Operation | None:
        def q(conn: psycopg.Connection[Any]) -> Operation | None:
            with conn.cursor(row_factory=class_row(Operation)) as cur:
                query = sql.SQL(
                    "UPDATE operations SET status = 'running', attempts = attempts + 1, "
                    "started_at = coalesce(started_at, now()), worker = %s, updated_at = now() "
                    "WHERE id = %s AND status IN ('scheduled', 'running') RETURNING {}"
                ).format(OPERATION_COLUMNS)
                return cur.execute(query, (self.worker, self.op_id)).fetchone()

        return self._q(q)

    def _flags(self) -> tuple[bool, float]:
        """(cancel requested, seconds left before the deadline)."""

        def q(conn: psycopg.Connection[Any]) -> tuple[bool, float]:
            row = conn.execute(
                "SELECT cancel_requested, extract(epoch FROM deadline - now())::float8 "
                "FROM operations WHERE id = %s",
                (self.op_id,),
            ).fetchone()
            assert row is not None
            return bool(row[0]), float(row[1])

        return self._q(q)

    def _boundary(self, state: dict[str, Any]) -> tuple[bool, float]:
        """Record the step that finished (with the state it left) and those
        skipped since, and read the flags, in one statement."""
        args = {**self._recorded(), "state": Jsonb(state)}

        def q(conn: psycopg.Connection[Any]) -> tuple[bool, float]:
            row = conn.execute(
                "WITH fin AS (UPDATE operation_steps SET status = 'finished', "  # noqa: S608
                "finished_at = now() WHERE operation_id = %(id)s AND position = %(prev)s::int "
                "RETURNING 1), " + _SKIPPED + " "
                "UPDATE operations SET result = CASE WHEN %(prev)s::int IS NULL THEN result "
                "ELSE %(state)s END, updated_at = now() WHERE id = %(id)s "
                "RETURNING cancel_requested, extract(epoch FROM deadline - now())::float8",
                args,
            ).fetchone()
            assert row is not None
            return bool(row[0]), float(row[1])

        out = self._q(q)
        self._written()
        return out

    def _advance(
        self,
        position: int,
        name: str,
        state: dict[str, Any],
        *,
        cancellable: bool,
        durable: bool = False,
    ) -> tuple[bool, bool, float]:
        """Between two steps: record the one that finished (with the state it
        left) and those skipped since, read the flags, and record the start
        of step `position` if it may start (no cancel it must honour,
        deadline not passed, unless committed), all in one statement:
        (started, cancel requested, seconds left). The operation's row is
        updated first, under its row lock, which the cancel API takes too:
        a cancel cannot slip past the decision. `durable` flushes the
        commit (a final step's start: from then on it only goes forward)."""
        args = {
            **self._recorded(),
            "state": Jsonb(state),
            "pos": position,
            "name": name,
            "committed": self.committed,
            "cancellable": cancellable,
        }
        stmt = _ADVANCE_DURABLE if durable else _ADVANCE

        def q(conn: psycopg.Connection[Any]) -> tuple[bool, bool, float]:
            row = conn.execute(stmt, args).fetchone()
            assert row is not None
            return bool(row[0]), bool(row[1]), float(row[2])

        out = self._q(q)
        self._written()
        return out

    def _step_started(self, position: int, name: str, *, final: bool = False) -> bool:
        """Record the start of a step. A final step starts only if no cancel
        was asked for, decided under the operation's row lock (the cancel
        API takes the same lock), so a cancel never slips past it; its start
        is flushed, since from then on the operation only goes forward."""
        stmt = (
            "WITH {durable}op AS (UPDATE operations SET current_step = %(name)s, "  # noqa: S608 (constants)
            "updated_at = now() {flushed}WHERE id = %(id)s "
            "AND (NOT %(final)s OR NOT cancel_requested) RETURNING operations.id) "
            + _START_STEP.format(where="")
        ).format(durable=f"{_DURABLE}, " if final else "", flushed="FROM durable " if final else "")
        args = {"id": self.op_id, "pos": position, "name": name, "final": final}

        def q(conn: psycopg.Connection[Any]) -> bool:
            return conn.execute(stmt, args).fetchone() is not None

        return self._q(q)

    def _step_error(self, position: int, error: str, *, failed: bool) -> None:
        def q(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "UPDATE operation_steps SET error = %s, status = %s, "
                "finished_at = CASE WHEN %s THEN now() END, "
                "attempts = attempts + CASE WHEN %s THEN 0 ELSE 1 END "
                "WHERE operation_id = %s AND position = %s",
                (
                    error[:1000],
                    "failed" if failed else "running",
                    failed,
                    failed,
                    self.op_id,
                    position,
                ),
            )

        self._q(q)

    def _mark_deadline_missed(self) -> None:
        def q(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "UPDATE operations SET deadline_missed = true WHERE id = %s "
                "AND deadline < now() AND NOT deadline_missed",
                (self.op_id,),
            )

        self._q(q)

    def _end(self, status: str, *, error: str | None, state: dict[str, Any]) -> None:
        """The operation's end (with its last step's), flushed, and notified."""
        recorded = self._recorded()

        def q(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "WITH " + _DURABLE + ", "  # noqa: S608 (constants)
                "fin AS (UPDATE operation_steps SET status = 'finished', "
                "finished_at = now() FROM durable WHERE operation_id = %(id)s "
                "AND position = %(prev)s::int RETURNING 1), " + _SKIPPED + " "
                "UPDATE operations SET status = %(status)s, error = %(error)s, "
                "result = %(state)s, current_step = NULL, finished_at = now(), "
                "updated_at = now(), deadline_missed = deadline_missed OR deadline < now() "
                "FROM durable WHERE id = %(id)s AND status = 'running' "
                "RETURNING pg_notify(%(channel)s, %(id)s::text)",
                {
                    **recorded,
                    "status": status,
                    "error": error,
                    "state": Jsonb(state),
                    "channel": NOTIFY_CHANNEL,
                },
            )

        self._q(q)
        self._written()

    def _step_positions(self) -> tuple[set[int], set[int]]:
        """(finished or skipped steps, started steps) of this operation so far."""

        def q(conn: psycopg.Connection[Any]) -> tuple[set[int], set[int]]:
            rows = conn.execute(
                "SELECT position, status FROM operation_steps WHERE operation_id = %s",
                (self.op_id,),
            ).fetchall()
            done = {p for p, st in rows if st in ("finished", "skipped")}
            return done, {p for p, st in rows if st != "skipped"}

        return self._q(q)

    # -- the run ---------------------------------------------------------------

    def run(self) -> str:
        try:
            return self._run()
        except _LostLocks:
            # Left as it is: the recovery loop queues it again, and whoever
            # takes the locks next resumes it.
            log.warning("operation %s: lost its locks; leaving it to be resumed", self.op_id)
            return "lost"

    def _run(self) -> str:
        op = self._claim()
        if op is None:
            row = self._q(
                lambda c: c.execute(
                    "SELECT status FROM operations WHERE id = %s", (self.op_id,)
                ).fetchone()
            )
            return str((row or ("missing",))[0])
        kind = REGISTRY.kinds[op.type]
        ctx = OpContext(self.p, op, dict(op.result or {}), stop_reason=self._stop_reason)
        # A first attempt has recorded no step yet: no need to ask.
        done, started = self._step_positions() if op.attempts > 1 else (set(), set())
        # Past the point of no return (a final step has started, in this run
        # or before a crash) an operation only goes forward: no cancel, and
        # its deadline is reported (deadline_missed) but no longer fails it,
        # since undoing is no longer possible.
        self.committed = any(kind.steps[i].final for i in started if i < len(kind.steps))
        position = -1
        try:
            for position, step in enumerate(kind.steps):
                if position in done:
                    continue
                if self.hand_off is not None and self.hand_off():
                    raise _HandOff
                if self._skips(step, ctx):
                    self.skipped.append((position, step.name))
                    continue
                final = step.final and not self.committed
                # The previous step's end and this one's start, in one
                # statement (two round trips fewer per step); a final step's
                # start is flushed.
                began, cancel, left = self._advance(
                    position,
                    step.name,
                    ctx.state,
                    cancellable=kind.cancellable_before(position),
                    durable=final,
                )
                if not began:
                    self._before_step(kind, position, cancel, left)
                    # The clocks disagreed; a final step still starts only
                    # if no cancel came.
                    if not self._step_started(position, step.name, final=final):
                        raise _Cancelled
                if final:
                    self.committed = True
                failpoint(f"{kind.name}.{step.name}.before")
                self.running = position
                self._run_step(kind, position, step, ctx)
                self.running = None
                failpoint(f"{kind.name}.{step.name}.after")
                self.unrecorded = position
        except _Cancelled:
            if self.running is not None:
                # Cancelled while it was being retried: it did not finish.
                self._step_error(self.running, "cancelled before it could finish", failed=True)
            return self._cancel(kind, ctx)
        except _HandOff:
            if self.unrecorded is not None or self.skipped:
                self._boundary(ctx.state)
            log.info("operation %s: handed to the workers", self.op_id)
            return "handed_off"
        except _LostLocks:
            raise
        except Exception as e:
            return self._fail(kind, ctx, position, e)
        self._end("finished", error=None, state=ctx.state)
        log.info("operation %s (%s) finished", self.op_id, kind.name)
        return "finished"

    def _before_step(self, kind: OperationKind, position: int, cancel: bool, left: float) -> None:
        if self.committed:
            return
        if cancel and kind.cancellable_before(position):
            raise _Cancelled
        if left <= 0:
            raise DeadlineExceeded(
                f"operation {self.op_id} passed its deadline before step "
                f"{kind.steps[position].name}"
            )

    def _stop_reason(self) -> str | None:
        """For a long step: should it stop now? Never past the point of no
        return."""
        if self.committed:
            return None
        cancel, left = self._flags()
        if cancel:
            return "cancelled"
        return "deadline" if left <= 0 else None

    def _run_step(self, kind: OperationKind, position: int, step: Step, ctx: OpContext) -> None:
        delay = 0.1
        attempt = 1
        while True:
            try:
                step.run(ctx)
                return
            except Interrupted as e:
                cancel, _ = self._flags()
                if cancel:
                    raise _Cancelled from e
                raise DeadlineExceeded(
                    f"step {step.name} was stopped at the operation's deadline"
                ) from e
            except TRANSIENT as e:
                cancel, left = self._flags()
                msg = _describe(e)
                if self.committed:
                    left = float("inf")  # forward only: keep trying
                elif cancel:
                    raise _Cancelled from e
                if left <= delay:
                    raise DeadlineExceeded(
                        f"step {step.name} kept failing until the operation's deadline "
                        f"({attempt} attempts): {msg}"
                    ) from e
                log.warning(
                    "operation %s step %s attempt %d failed (%s); retrying in %.1fs",
                    self.op_id,
                    step.name,
                    attempt,
                    msg,
                    delay,
                )
                self._step_error(position, f"attempt {attempt}: {msg}", failed=False)
                time.sleep(delay)
                if self.hand_off is not None and self.hand_off():
                    raise _HandOff from e
                delay = min(delay * 2, MAX_BACKOFF_S, max(left - delay, 0.05))
                if self.committed:
                    self._mark_deadline_missed()
                attempt += 1

    def _cancel(self, kind: OperationKind, ctx: OpContext) -> str:
        error = None
        if kind.on_cancel is not None:
            try:
                kind.on_cancel(ctx)
            except Exception as e:  # leave it to the reconciler, and say so
                error = f"cancelled, but undoing its steps failed: {_describe(e)}"
        self._end("cancelled", error=error, state=ctx.state)
        log.info("operation %s (%s) cancelled", self.op_id, kind.name)
        return "cancelled"

    def _fail(self, kind: OperationKind, ctx: OpContext, position: int, e: Exception) -> str:
        msg = _describe(e)
        # What the API answers a caller that waited: the underlying cause's
        # status (a region that stayed down is 503, not 504).
        cause: BaseException = e
        if isinstance(e, DeadlineExceeded) and isinstance(e.__cause__, RegionUnavailable):
            cause = e.__cause__
        if isinstance(cause, PgfleetError):
            ctx.state.update(error_code=cause.code, error_status=cause.status_code)
            if cause.details.get("region"):
                ctx.state["error_region"] = cause.details["region"]
        else:
            ctx.state.update(error_code="operation_failed", error_status=500)
        if position >= 0:
            try:
                self._step_error(position, msg, failed=True)
            except Exception:
                log.exception("operation %s: could not record the failed step", self.op_id)
        if not isinstance(e, (PgfleetError, *TRANSIENT)):
            log.exception("operation %s (%s) failed unexpectedly", self.op_id, kind.name)
        if kind.on_failure is not None:
            try:
                kind.on_failure(ctx, msg)
            except Exception as ce:
                msg += f" (and undoing its steps failed: {_describe(ce)})"
        self._end("failed", error=msg, state=ctx.state)
        log.info("operation %s (%s) failed: %s", self.op_id, kind.name, msg)
        return "failed"


def _describe(e: BaseException) -> str:
    if isinstance(e, PgfleetError):
        return e.message
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
