"""One thread that cancels statements past their deadline (a timer thread per
request would cost more than the statements it guards)."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from typing import Any

import psycopg


class Watchdog:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, psycopg.Connection[Any]]] = []
        self._live: set[int] = set()
        self._cancelling: set[int] = set()
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, conn: psycopg.Connection[Any], timeout_s: float) -> int:
        """Cancel `conn`'s running statement after `timeout_s` unless disarmed."""
        handle = next(self._ids)
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + timeout_s, handle, conn))
            self._live.add(handle)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pgfleet-watchdog", daemon=True
                )
                self._thread.start()
            self._cv.notify()
        return handle

    def disarm(self, handle: int) -> None:
        """After this returns no cancel for `handle` is pending, so the
        connection can go back to its pool."""
        with self._cv:
            self._live.discard(handle)
            while handle in self._cancelling:
                self._cv.wait()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cv.wait()
                    continue
                deadline, handle, conn = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._cv.wait(delay)
                    continue
                heapq.heappop(self._heap)
                self._live.discard(handle)
                self._cancelling.add(handle)
            with contextlib.suppress(Exception):  # the statement may just have finished
                conn.cancel_safe(timeout=2)
            with self._cv:
                self._cancelling.discard(handle)
                self._cv.notify_all()


WATCHDOG = Watchdog()
