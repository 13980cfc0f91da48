"""Serving the API from several processes (`PGFLEET_API_WORKERS`), each
accepting on a listening socket of its own.

uvicorn's own workers share the one socket their parent bound, and whichever
is woken first accepts every connection waiting there: all 16 keep-alive
connections of a benchmark's burst landed in one of two processes in half of
the runs, and the API served half what it could (bench/sql_api.py: about
1,700 against 2,600 requests a second at concurrency 16, in one run). Here
each process binds the port itself with SO_REUSEPORT, so the kernel spreads
new connections over the processes' sockets (by a hash of the client's
address and port), as nginx's `reuseport` does.

The parent binds nothing and serves nothing: it starts the processes, starts
a new one when one dies or stops answering, and stops them all on SIGTERM or
SIGINT.

A process that is alive but no longer runs its event loop (stopped with
SIGSTOP, or stuck in a call that blocks the loop) would keep its socket, and
the kernel would go on sending it its share of new connections, which would
hang. So each process's event loop beats once a second (uvicorn's
`callback_notify`, the hook gunicorn's workers beat through), and the parent
kills one whose beat is older than `stall_timeout_s`; the replacement takes
its place as for a death. A process that has not beaten yet (its app is
starting) gets `start_timeout()` instead: longer, so a slow start is never
killed, but one stopped or stuck before it served is replaced too. Until it
listens it takes no connections, but the API would run one process short.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from pgfleet.net import passive_address, port_free

log = logging.getLogger("uvicorn.error")

STOP_WAIT_S = 10.0
BEAT_EVERY_S = 1  # uvicorn's timeout_notify is whole seconds


def start_timeout(stall_timeout_s: float) -> float:
    """How long a process may take from its start to its first beat: an
    app's start (imports, the platform DB's pool, the embedded workers)
    takes a few seconds, on a loaded host many more. A process killed at
    it is replaced after a pause that grows while its starts keep failing
    young (under a minute); at the default 70 s, once a minute at most."""
    return max(30.0, 2 * stall_timeout_s + 10)


def spreads_connections() -> bool:
    """Whether this system can give each process a socket of its own on one port."""
    return hasattr(socket, "SO_REUSEPORT")


def bound(host: str, port: int) -> socket.socket:
    """A socket bound to host:port that shares the port with the other
    processes' (same user only: Linux refuses another user's). Not yet
    listening: the server listens once its app has started, and until then
    the kernel sends it no connections."""
    family, address = passive_address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _orphaned(parent: int) -> None:
    """Ends this process once its parent is gone (killed with SIGKILL, say):
    an orphan would keep serving on the port, and a new API there would
    find it taken."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _beating(beat: Any) -> Callable[[], Awaitable[None]]:
    """uvicorn's `callback_notify`: run on the event loop, so it stops when
    the loop does. `beat` is a shared double the parent reads."""

    async def notify() -> None:
        beat.value = time.monotonic()  # CLOCK_MONOTONIC: one clock for all processes

    return notify


def _process_main(config: uvicorn.Config, parent: int, beat: Any) -> None:
    """One API process (run in a spawned child: `config` came pickled)."""
    threading.Thread(target=_orphaned, args=(parent,), daemon=True).start()
    config.callback_notify = _beating(beat)
    config.timeout_notify = BEAT_EVERY_S
    config.configure_logging()
    try:
        sock = bound(config.host, config.port)
    except OSError as e:
        # As uvicorn does: a process that cannot bind fails to start, and
        # the parent stops rather than start another every half second.
        log.error("cannot listen on %s:%s: %s", config.host, config.port, e)
        sys.exit(STARTUP_FAILURE)
    uvicorn.Server(config).run(sockets=[sock])


def serve(config: uvicorn.Config, processes: int, stall_timeout_s: float = 30.0) -> None:
    """Run `processes` API processes until SIGTERM or SIGINT. `config.app`
    must be an import string (each process builds its own app). A process
    whose event loop has not run for `stall_timeout_s` (or that has not
    started serving within `start_timeout(stall_timeout_s)`) is killed and
    replaced. Raises OSError if something listens on the port already."""
    if not port_free(config.host, config.port):
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    ctx = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)

    beats = [ctx.Value("d", 0.0, lock=False) for _ in range(processes)]

    def start(i: int) -> BaseProcess:
        beats[i].value = 0.0  # no beat until its app has started
        p = ctx.Process(
            target=_process_main, args=(config, os.getpid(), beats[i]), name="pgfleet-api"
        )
        p.start()
        return p

    started_within = start_timeout(stall_timeout_s)
    slots: list[BaseProcess | None] = [start(i) for i in range(processes)]
    since = [time.monotonic()] * processes  # when each slot's process started
    due = [0.0] * processes  # when an empty slot gets its next process
    deaths = [0] * processes  # each slot's processes in a row that died young
    failed = False
    log.info("started %d API processes (parent %d)", processes, os.getpid())
    try:
        while not stopping.wait(0.5):
            now = time.monotonic()
            for i, p in enumerate(slots):
                if p is None:
                    if now >= due[i]:
                        slots[i], since[i] = start(i), now
                    continue
                if p.is_alive():
                    last = beats[i].value
                    quiet = now - (last or since[i])
                    if quiet > (stall_timeout_s if last else started_within) and p.pid:
                        # SIGKILL: a stopped process takes no other signal.
                        log.warning(
                            "API process %s has not run for %.0f s (stopped or stuck); killing it"
                            if last
                            else "API process %s has not started serving in %.0f s "
                            "(stopped or stuck); killing it",
                            p.pid,
                            quiet,
                        )
                        os.kill(p.pid, signal.SIGKILL)
                        p.join(5.0)
                    if p.is_alive():
                        continue
                if p.exitcode == STARTUP_FAILURE:
                    # It failed before serving: every new one would too.
                    log.error("API process %s failed to start; stopping", p.pid)
                    failed = True
                    stopping.set()
                    break
                # Replaced at once; one that keeps dying within a minute of
                # its start waits 1, 2, 4... up to 30 s: no busy loop.
                deaths[i] = deaths[i] + 1 if now - since[i] < 60 else 1
                delay = min(30.0, 2.0 ** (deaths[i] - 2)) if deaths[i] > 1 else 0.0
                log.warning(
                    "API process %s ended (exit code %s); another starts in %.0f s",
                    p.pid,
                    p.exitcode,
                    delay,
                )
                slots[i], due[i] = None, now + delay
    finally:
        alive = [p for p in slots if p is not None]
        for p in alive:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S  # one wait for them all
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in alive:
            if p.is_alive():
                p.kill()
                p.join()
    if failed:
        raise SystemExit(STARTUP_FAILURE)
