"""The job queue (procrastinate on the platform DB) and the workers.

An operation row is the source of truth; its procrastinate job only says
"run operation X". Deferring happens after the row is committed, so a
process that dies in between leaves a `scheduled` operation without a job:
every worker's recovery loop finds those and defers them again. The same
loop hands jobs of dead workers (no heartbeat) back to the queue, marks
operations past their deadline, and runs the reconciler now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import procrastinate
import psycopg
from procrastinate import exceptions as pexc
from psycopg_pool import PoolTimeout

from pgfleet.errors import PlatformUnavailable
from pgfleet.operations import kinds as _kinds  # noqa: F401  (registers the kinds)
from pgfleet.operations.runner import execute_operation
from pgfleet.platform.core import Platform

log = logging.getLogger(__name__)

TASK_NAME = "pgfleet.run_operation"
QUEUE = "operations"


def _run_operation_job(context: procrastinate.JobContext, operation_id: str) -> str:
    platform: Platform = context.additional_context["platform"]
    name = context.worker_name or "worker"
    return execute_operation(platform, operation_id, worker=name)


EXPIRE_TASK = "pgfleet.expire_credentials"


def _expire_job(context: procrastinate.JobContext, tenant_id: str, roles: list[str]) -> str:
    """The overlap window of a rotation ended: start the operation that
    expires the old credentials (retried while the project is busy)."""
    from pgfleet.operations.store import audit, insert_operation

    platform: Platform = context.additional_context["platform"]
    tid = uuid.UUID(tenant_id)
    with platform.db.connection() as conn, conn.transaction():
        row = conn.execute("SELECT status, owner_id FROM tenants WHERE id = %s", (tid,)).fetchone()
        if row is None or row[0] in ("deleted", "deleting"):
            return "project gone"
        op_id = insert_operation(
            conn,
            type="expire_credentials",
            tenant_id=tid,
            owner_id=row[1],
            actor="pgfleet",
            params={"roles": roles},
            deadline_s=platform.settings.operation_deadline_s,
        )
        audit(
            conn,
            actor="pgfleet",
            action="project.expire_credentials",
            tenant_id=tid,
            operation_id=op_id,
            details={"roles": roles, "reason": "rotation overlap window ended"},
        )
    platform.ops.dispatcher.defer(op_id)
    return str(op_id)


def build_app(connector: procrastinate.BaseConnector) -> procrastinate.App:
    from pgfleet.errors import Conflict

    app = procrastinate.App(connector=connector)
    app.task(
        name=TASK_NAME,
        queue=QUEUE,
        pass_context=True,
        # The platform DB away when the job starts: try again shortly (the
        # operation itself keeps its state in the platform DB).
        retry=procrastinate.RetryStrategy(
            max_attempts=10_000, wait=1, retry_exceptions={PlatformUnavailable}
        ),
    )(_run_operation_job)
    app.task(
        name=EXPIRE_TASK,
        queue=QUEUE,
        pass_context=True,
        # A busy project (409) or an unreachable platform DB is tried again shortly.
        retry=procrastinate.RetryStrategy(
            max_attempts=10_000,
            wait=1,
            retry_exceptions={
                Conflict,
                PlatformUnavailable,
                psycopg.OperationalError,
                PoolTimeout,
            },
        ),
    )(_expire_job)
    return app


def schedule_expiry(
    platform: Platform, tenant_id: uuid.UUID, roles: list[str], after_s: int, *, key: str
) -> str:
    """Queue the end of an overlap window; returns when it is due (ISO 8601)."""
    due = datetime.now(UTC) + timedelta(seconds=after_s)
    task = platform.ops.dispatcher.app.tasks[EXPIRE_TASK]
    with contextlib.suppress(pexc.AlreadyEnqueued):
        task.configure(schedule_at=due, queueing_lock=f"expire:{key}").defer(
            tenant_id=str(tenant_id), roles=list[Any](roles)
        )
    return due.isoformat()


class Dispatcher:
    """Defers operation jobs from a synchronous process (API, CLI), through
    the Platform's own connection pool."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.app = build_app(procrastinate.SyncPsycopgConnector())
        self.app.open(platform.db)

    def defer(self, op_id: uuid.UUID) -> int | None:
        task = self.app.tasks[TASK_NAME]
        try:
            job_id = task.configure(queueing_lock=f"op:{op_id}").defer(operation_id=str(op_id))
        except pexc.AlreadyEnqueued:
            return None  # a job for it is already waiting
        with self.platform.db.connection() as conn:
            conn.execute("UPDATE operations SET job_id = %s WHERE id = %s", (job_id, op_id))
        return job_id

    def cancel_job(self, job_id: int) -> None:
        with contextlib.suppress(pexc.ProcrastinateException):
            self.app.job_manager.cancel_job_by_id(job_id, abort=False)

    def close(self) -> None:
        self.app.close()


_SWEEP_SQL = """
SELECT o.id FROM operations o
LEFT JOIN procrastinate_jobs j ON j.id = o.job_id
WHERE o.status IN ('scheduled', 'running')
  AND o.updated_at < now() - make_interval(secs => %s)
  AND (j.id IS NULL OR j.status NOT IN ('todo', 'doing'))
ORDER BY o.created_at
LIMIT 100
"""


class _OutageNoise(logging.Filter):
    """procrastinate logs every failed heartbeat, poll and listen with a
    traceback, several a second while the platform DB is away; the worker
    says it once itself (see Worker._main)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None:
            if isinstance(exc, (psycopg.OperationalError, PoolTimeout, PlatformUnavailable)):
                return False
            exc = exc.__cause__ or exc.__context__
        return True


def quiet_outage_noise(worker_name: str | None = None) -> None:
    """Keep the log to one line per change of state during an outage: our
    own components report it; psycopg_pool's per-attempt warnings and
    procrastinate's per-poll tracebacks are dropped."""
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    noise = _OutageNoise()
    names = list(logging.Logger.manager.loggerDict)
    if worker_name is not None:  # procrastinate logs jobs on a child named after the worker
        names.append(f"procrastinate.worker.{worker_name}")
    for name in names:
        if name == "procrastinate" or name.startswith("procrastinate."):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _OutageNoise) for f in logger.filters):
                logger.addFilter(noise)


class Worker:
    """A procrastinate worker running pgfleet operations, with its recovery loop.

    `run()` blocks (for `pgfleet worker`); `start()`/`stop()` run it in a
    thread of an API process (the embedded worker).
    """

    def __init__(
        self, platform: Platform, *, concurrency: int | None = None, name: str | None = None
    ) -> None:
        s = platform.settings
        self.platform = platform
        # Operations started from inside a worker never start more workers.
        platform.ops.autostart = False
        self.concurrency = concurrency or s.worker_concurrency
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._last_reconcile = time.monotonic()
        quiet_outage_noise(self.name)

    # -- lifecycle -------------------------------------------------------------

    def run(self, *, install_signal_handlers: bool = True) -> None:
        asyncio.run(self._main(install_signal_handlers))

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.run,
            kwargs={"install_signal_handlers": False},
            name=f"worker-{self.name}",
            daemon=True,
        )
        self._thread.start()
        self._ready.wait(timeout=30)

    def request_stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)

    def stop(self, timeout: float = 30.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    async def _main(self, install_signal_handlers: bool) -> None:
        """Run the worker, and run it again whenever it stops by itself (the
        platform DB went away under it): it waits until the database answers,
        then starts afresh (new connections, no backoff left over)."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if install_signal_handlers:
            # Ours, not procrastinate's: a signal must stop this loop too, not
            # only the current run of the worker (which would then be restarted).
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop.set)
        failing = False
        delay = 0.2
        while not self._stop.is_set():
            why: BaseException | str
            if await self._platform_answers():
                try:
                    if await self._run_worker():
                        return  # asked to stop
                    why = "it stopped by itself"
                except Exception as e:
                    why = e
            else:
                why = "the platform DB is unreachable"
            self._ready.set()  # alive, and will start when it can: nobody waits on it
            if not failing:
                log.warning(
                    "worker %s is not running (%s); starting again when it can", self.name, why
                )
            failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, 5.0)

    async def _platform_answers(self) -> bool:
        try:
            conn = await psycopg.AsyncConnection.connect(
                **{**self.platform.conninfo, "connect_timeout": 2}
            )
            await conn.close()
            self.platform.breaker.answered()
            return True
        except psycopg.Error as e:
            self.platform.breaker.trip(e)
            return False

    async def _run_worker(self) -> bool:
        """One run of the procrastinate worker; True when it ended because
        it was asked to stop."""
        assert self._stop is not None
        s = self.platform.settings
        connector = procrastinate.PsycopgConnector(
            kwargs={
                **self.platform.conninfo,
                "application_name": "pgfleet-worker-queue",
                "connect_timeout": 2,
            },
            min_size=1,
            max_size=max(2, self.concurrency + 2),
            timeout=5,
        )
        app = build_app(connector)
        async with app.open_async():
            worker = asyncio.create_task(
                app.run_worker_async(
                    queues=[QUEUE],
                    name=self.name,
                    concurrency=self.concurrency,
                    additional_context={"platform": self.platform},
                    install_signal_handlers=False,
                    update_heartbeat_interval=s.worker_heartbeat_s,
                    stalled_worker_timeout=s.worker_stalled_s,
                    fetch_job_polling_interval=max(s.worker_heartbeat_s, 1.0),
                    abort_job_polling_interval=max(s.worker_heartbeat_s, 1.0),
                    shutdown_graceful_timeout=s.worker_shutdown_s,
                )
            )
            recovery = asyncio.create_task(self._recovery_loop(app))
            if not self._ready.is_set():
                self._ready.set()
            else:
                log.warning("worker %s is running again", self.name)
            stopper = asyncio.create_task(self._stop.wait())
            await asyncio.wait({worker, stopper}, return_when=asyncio.FIRST_COMPLETED)
            recovery.cancel()
            stopper.cancel()
            if not worker.done():
                worker.cancel()
            failure: BaseException | None = None
            for t in (worker, recovery, stopper):
                try:
                    await t
                except (asyncio.CancelledError, Exception) as e:
                    if t is worker and not isinstance(e, asyncio.CancelledError):
                        failure = e
            if self._stop.is_set():
                return True
            if failure is not None:
                raise failure
            return False

    # -- recovery ---------------------------------------------------------------

    async def _recovery_loop(self, app: procrastinate.App) -> None:
        s = self.platform.settings
        failing = False
        while True:
            try:
                await self.recover_once(app)
                failing = False
            except asyncio.CancelledError:
                raise
            except (PlatformUnavailable, psycopg.Error, pexc.ConnectorException) as e:
                if not failing:
                    log.warning("worker %s: recovery pass failed: %s", self.name, e)
                failing = True
            except Exception:
                log.exception("worker %s: recovery pass failed", self.name)
            await asyncio.sleep(s.worker_heartbeat_s)

    async def recover_once(self, app: procrastinate.App) -> None:
        s = self.platform.settings
        for job in await app.job_manager.get_stalled_jobs(
            queue=QUEUE, seconds_since_heartbeat=s.worker_stalled_s
        ):
            log.warning(
                "worker %s: job %s of a dead worker goes back to the queue", self.name, job.id
            )
            try:
                await app.job_manager.retry_job(job)
            except pexc.ProcrastinateException as e:
                log.warning("could not requeue job %s: %s", job.id, e)
        await asyncio.to_thread(self._sweep)
        if s.spare_databases:
            await asyncio.to_thread(self._refill)
        if time.monotonic() - self._last_reconcile > s.reconcile_interval_s:
            self._last_reconcile = time.monotonic()
            await asyncio.to_thread(self._reconcile)

    def _sweep(self) -> None:
        p = self.platform
        with p.db.connection() as conn:
            lost = [
                r[0] for r in conn.execute(_SWEEP_SQL, (self.platform.settings.worker_stalled_s,))
            ]
            conn.execute(
                "UPDATE operations SET deadline_missed = true WHERE status IN "
                "('scheduled', 'running') AND deadline < now() AND NOT deadline_missed"
            )
        for op_id in lost:
            log.warning("operation %s has no live job; deferring it again", op_id)
            p.ops.dispatcher.defer(op_id)

    def _refill(self) -> None:
        from pgfleet.errors import RegionUnavailable
        from pgfleet.tenants.provisioning import refill_spares

        p = self.platform
        for server in p.servers.all(enabled_only=True):
            try:
                with p.servers.admin_connection(server) as conn:
                    refill_spares(conn, p.settings.spare_databases)
            except (RegionUnavailable, psycopg.Error) as e:
                log.debug("spares for %s not refilled: %s", server.name, e)

    def _reconcile(self) -> None:
        from pgfleet.operations.reconcile import reconcile

        reconcile(self.platform, repair=False, record=True)
