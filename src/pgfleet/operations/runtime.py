"""What one control-plane process needs to run operations: the dispatcher
that defers jobs, a waiter that learns when operations end (LISTEN on the
platform DB, with polling as a fallback), and the embedded workers an API
process runs itself (`PGFLEET_EMBEDDED_WORKERS`). One per Platform:
`OperationsRuntime.of(platform)`.

A process that runs embedded workers also runs the operations it starts
itself, at once, in a few threads of its own (`PGFLEET_INLINE_OPERATIONS`):
a caller who waits for a create does not pay for the queue (deferring the
job, a worker noticing it, the worker's notification back). It is the same
execution a worker does (the operation's locks, its recorded steps), so a
process that dies mid-way leaves the operation to the workers' recovery
loop like a dead worker does. An inline execution retries like a worker
(the threads are few: beyond them operations go to the queue); a process
shutting down hands its inline operations to the queue at their next step
boundary or retry."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from pgfleet.operations.dispatch import Dispatcher
from pgfleet.operations.runner import execute_operation
from pgfleet.operations.store import NOTIFY_CHANNEL, Operation, get_operation
from pgfleet.operations.worker import Worker
from pgfleet.platform.core import Platform

log = logging.getLogger(__name__)


class _Listener:
    """One LISTEN connection per process; wakes the threads waiting on an operation."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._waiting: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ops-listener", daemon=True)
        self._thread.start()
        self._listening.wait(timeout=5)

    def _run(self) -> None:
        lost = False
        delay = 0.2
        while not self._closed.is_set():
            try:
                with psycopg.connect(
                    **{
                        **self.platform.conninfo,
                        "autocommit": True,
                        "application_name": "pgfleet-ops-listener",
                        "connect_timeout": 2,
                    }
                ) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    if lost:
                        log.warning("operations listener is listening again")
                        self.platform.breaker.answered()
                    lost, delay = False, 0.2
                    self._listening.set()
                    self._wake_all()  # anything that ended while we were away
                    while not self._closed.is_set():
                        for n in conn.notifies(timeout=0.5):
                            self._wake(n.payload)
            except Exception as e:  # whatever it was, listen again; waiters poll meanwhile
                if self._closed.is_set():
                    return
                if not lost:  # once per outage
                    log.warning("operations listener lost its connection (%s); reconnecting", e)
                    if isinstance(e, psycopg.OperationalError):
                        self.platform.breaker.trip(e)
                lost = True
                self._listening.set()
                self._wake_all()
                self._closed.wait(delay)
                delay = min(delay * 2, 2.0)

    def _wake(self, op_id: str) -> None:
        with self._lock:
            for ev in self._waiting.get(op_id, ()):
                ev.set()

    def _wake_all(self) -> None:
        with self._lock:
            for evs in self._waiting.values():
                for ev in evs:
                    ev.set()

    def register(self, op_id: str) -> threading.Event:
        ev = threading.Event()
        with self._lock:
            self._waiting.setdefault(op_id, set()).add(ev)
        return ev

    def unregister(self, op_id: str, ev: threading.Event) -> None:
        with self._lock:
            evs = self._waiting.get(op_id)
            if evs is not None:
                evs.discard(ev)
                if not evs:
                    del self._waiting[op_id]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)


class OperationsRuntime:
    @classmethod
    def of(cls, platform: Platform) -> OperationsRuntime:
        """The platform's runtime (made on first use, closed with it)."""
        return platform.component("operations", lambda: cls(platform), close=cls.close)

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._lock = threading.Lock()
        self._dispatcher: Dispatcher | None = None
        self._listener: _Listener | None = None
        self.workers: list[Worker] = []
        self.autostart = True
        self._inline: ThreadPoolExecutor | None = None
        self._inline_slots = threading.Semaphore(max(1, platform.settings.worker_concurrency))
        self._running_here: dict[str, Future[str]] = {}
        self._closing = threading.Event()

    @property
    def dispatcher(self) -> Dispatcher:
        with self._lock:
            if self._dispatcher is None:
                self._dispatcher = Dispatcher(self.platform)
            return self._dispatcher

    def start_workers(self, n: int | None = None) -> None:
        """Start the embedded workers (once per process)."""
        count = self.platform.settings.embedded_workers if n is None else n
        with self._lock:
            if self.workers:
                return
            self.autostart = False
            for _ in range(count):
                w = Worker(self.platform)
                w.start()
                self.workers.append(w)

    def submit(self, op_id: uuid.UUID) -> None:
        """Run a committed operation: here at once when this process runs
        embedded workers and has a free inline slot, else through the queue
        (an API process that has not started its embedded workers yet starts
        them)."""
        s = self.platform.settings
        if self.autostart and s.embedded_workers > 0 and not self.workers:
            self.start_workers()
        if (
            s.embedded_workers > 0
            and s.inline_operations
            and not self._closing.is_set()
            and self._inline_slots.acquire(blocking=False)
        ):
            with self._lock:
                if self._inline is None:
                    self._inline = ThreadPoolExecutor(
                        max_workers=max(1, s.worker_concurrency), thread_name_prefix="ops-inline"
                    )
                key = str(op_id)
                self._running_here[key] = self._inline.submit(self._run_here, op_id)
            return
        self.dispatcher.defer(op_id)

    def _run_here(self, op_id: uuid.UUID) -> str:
        try:
            status = execute_operation(
                self.platform,
                op_id,
                worker=f"{self.name}-inline",
                hand_off=self._closing.is_set,
            )
            if status in ("handed_off", "lost"):
                # A lost one is found by the recovery loop anyway; a
                # platform DB that is away makes this fail, and that is fine.
                with contextlib.suppress(Exception):
                    self.dispatcher.defer(op_id)
            return status
        except Exception:
            log.exception("operation %s: inline execution failed; queueing it", op_id)
            with contextlib.suppress(Exception):
                self.dispatcher.defer(op_id)
            return "handed_off"
        finally:
            self._inline_slots.release()
            with self._lock:
                self._running_here.pop(str(op_id), None)

    @property
    def name(self) -> str:
        return self.workers[0].name if self.workers else f"pid{os.getpid()}"

    def defer(self, op_id: uuid.UUID) -> None:
        """Queue a committed operation, starting no worker (from a job)."""
        self.dispatcher.defer(op_id)

    def defer_job(self, name: str, *, after_s: float, key: str, **kwargs: Any) -> str:
        """Queue a domain's job to run `after_s` seconds from now, once per
        `key`. Returns when it is due (ISO 8601)."""
        due = datetime.now(UTC) + timedelta(seconds=after_s)
        self.dispatcher.defer_job(name, at=due, key=key, **kwargs)
        return due.isoformat()

    def wait(self, op_id: uuid.UUID | str, timeout: float) -> Operation:
        """The operation once it has ended, or as it is when `timeout` runs out."""
        key = str(op_id)
        end = time.monotonic() + timeout
        with self._lock:
            here = self._running_here.get(key)
        if here is not None:
            # Running in this process: its end is the future's (no
            # notification round trip); a hand-off continues below.
            with contextlib.suppress(TimeoutError):
                if here.result(timeout) not in ("handed_off", "lost", "busy"):
                    with self.platform.db.connection() as conn:
                        return get_operation(conn, key)
            timeout = max(0.0, end - time.monotonic())
        with self._lock:
            if self._listener is None:
                self._listener = _Listener(self.platform)
            listener = self._listener
        ev = listener.register(key)
        try:
            end = time.monotonic() + timeout
            while True:
                with self.platform.db.connection() as conn:
                    op = get_operation(conn, key)
                left = end - time.monotonic()
                if op.ended or left <= 0:
                    return op
                ev.wait(min(left, 1.0))
                ev.clear()
        finally:
            listener.unregister(key, ev)

    def close(self) -> None:
        # Inline executions hand their operations to the queue at their next
        # step boundary.
        self._closing.set()
        if self._inline is not None:
            self._inline.shutdown(wait=True)
            self._inline = None
        # All asked to stop at once; each gets its graceful time, not the sum.
        for w in self.workers:
            w.request_stop()
        for w in self.workers:
            w.stop(timeout=self.platform.settings.worker_shutdown_s + 2)
        self.workers.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._dispatcher is not None:
            with contextlib.suppress(Exception):
                self._dispatcher.close()
            self._dispatcher = None
