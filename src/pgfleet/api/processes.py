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
a new one when one dies, and stops them all on SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

log = logging.getLogger("uvicorn.error")

STOP_WAIT_S = 10.0


def spreads_connections() -> bool:
    """Whether this system can give each process a socket of its own on one port."""
    return hasattr(socket, "SO_REUSEPORT")


def _address(host: str, port: int) -> tuple[socket.AddressFamily, Any]:
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return family, address


def port_is_free(host: str, port: int) -> None:
    """Raises OSError if something listens on host:port already. Bound
    without SO_REUSEPORT, so it fails against another pgfleet's processes
    too (a socket without the option cannot join their group)."""
    family, address = _address(host, port)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)


def listener(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket on host:port that shares the port with the other
    processes' (same user only: Linux refuses another user's)."""
    family, address = _address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
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


def _process_main(config: uvicorn.Config) -> None:
    """One API process (run in a spawned child: `config` came pickled)."""
    threading.Thread(target=_orphaned, args=(os.getppid(),), daemon=True).start()
    config.configure_logging()
    try:
        sock = listener(config.host, config.port, config.backlog)
    except OSError as e:
        # As uvicorn does: a process that cannot listen fails to start, and
        # the parent stops rather than start another every half second.
        log.error("cannot listen on %s:%s: %s", config.host, config.port, e)
        sys.exit(STARTUP_FAILURE)
    uvicorn.Server(config).run(sockets=[sock])


def serve(config: uvicorn.Config, processes: int) -> None:
    """Run `processes` API processes until SIGTERM or SIGINT. `config.app`
    must be an import string (each process builds its own app)."""
    port_is_free(config.host, config.port)
    ctx = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)

    def start() -> BaseProcess:
        p = ctx.Process(target=_process_main, args=(config,), name="pgfleet-api")
        p.start()
        return p

    running = [start() for _ in range(processes)]
    log.info("started %d API processes (parent %d)", processes, os.getpid())
    try:
        while not stopping.wait(0.5):
            for i, p in enumerate(running):
                if p.is_alive():
                    continue
                if p.exitcode == STARTUP_FAILURE:
                    # It failed before serving: every new one would too.
                    log.error("API process %s failed to start; stopping", p.pid)
                    stopping.set()
                    break
                log.warning(
                    "API process %s ended (exit code %s); starting another", p.pid, p.exitcode
                )
                running[i] = start()
    finally:
        for p in running:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        for p in running:
            p.join(STOP_WAIT_S)
            if p.is_alive():
                p.kill()
                p.join()
    if any(p.exitcode == STARTUP_FAILURE for p in running):
        raise SystemExit(STARTUP_FAILURE)
