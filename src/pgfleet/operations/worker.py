"""Operations workers: a procrastinate worker running operation jobs and the
domains' jobs, with its recovery loop (dead workers' jobs back to the
queue, operations whose job was lost queued again, deadlines marked, the
domains' periodic work), supervised so that it starts again by itself
after the platform DB went away under it."""

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
from typing import Any

import procrastinate
import psycopg
from procrastinate import exceptions as pexc
from psycopg_pool import PoolTimeout

from pgfleet.errors import PlatformUnavailable
from pgfleet.operations.dispatch import QUEUE, Dispatcher, build_app
from pgfleet.operations.locks import op_lock_key
from pgfleet.operations.registry import REGISTRY
from pgfleet.platform.core import Platform

log = logging.getLogger(__name__)

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
        self.concurrency = concurrency or s.worker_concurrency
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        # When each periodic job last ran (they all wait one interval first).
        self._last_run = {
            p.name: 0.0 if p.at_start else time.monotonic() for p in REGISTRY.periodic.values()
        }
        self._dispatcher: Dispatcher | None = None
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
        for periodic in REGISTRY.periodic.values():
            last = self._last_run.setdefault(periodic.name, 0.0)
            if time.monotonic() - last >= periodic.interval(s):
                self._last_run[periodic.name] = time.monotonic()
                try:
                    await asyncio.to_thread(periodic.run, self.platform)
                except (PlatformUnavailable, psycopg.Error) as e:
                    log.debug("periodic %s did not run: %s", periodic.name, e)

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
            # An operation with no job may still have an executor (an API
            # process running it inline): its lock says so.
            lost = [op_id for op_id in lost if not _executor_holds(conn, op_id)]
        for op_id in lost:
            log.warning("operation %s has no live job; deferring it again", op_id)
            self.dispatcher.defer(op_id)

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(self.platform)
        return self._dispatcher


def _executor_holds(conn: psycopg.Connection[Any], op_id: uuid.UUID) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (op_lock_key(op_id),)).fetchone()
    if row and row[0]:
        conn.execute("SELECT pg_advisory_unlock(%s)", (op_lock_key(op_id),))
        return False
    return True
