"""Managing the embedded fleet and the API process directly: up, down,
status, serve, worker.

The API (FastAPI, uvicorn) and the operations worker (procrastinate, the
domains) are imported inside `serve` and `worker` only: every other command
of the CLI is a small REST client and should start in a fraction of that
time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import psycopg
import typer
from rich.table import Table
from rich.text import Text

from pgfleet.auth import ensure_admin_token
from pgfleet.cli.common import (
    JsonOpt,
    add_row,
    api_file,
    app,
    err,
    fail,
    load_settings,
    out,
    pid_file,
    print_json,
    token_file,
)
from pgfleet.config import Settings
from pgfleet.crypto import write_private
from pgfleet.display import size
from pgfleet.errors import FleetError, PgfleetError
from pgfleet.fleet.embedded import ADMIN_USER, EmbeddedFleet, EmbeddedServer
from pgfleet.fleet.health import ServerHealth, check_server
from pgfleet.fleet.registry import ServerRecord
from pgfleet.fleet.router import Routers, RouterSpec
from pgfleet.net import port_free
from pgfleet.operations.store import deadline_summary
from pgfleet.platform.core import Platform, platform_conninfo, warn_weak_tls
from pgfleet.platform.metrics import MULTIPROC_ENV
from pgfleet.tenants import routing
from pgfleet.tenants import store as tenant_store

# ---- fleet management ------------------------------------------------------


def _print_router_lines(specs: list[RouterSpec], host: str, suffix: str = "") -> None:
    for spec in specs:
        out.print(
            f"  [green]up[/] router {spec.name:<27} {spec.pool_mode} pooling, "
            f"{host}:{spec.port}{suffix}",
            highlight=False,
        )


@app.command()
def up(
    detach: Annotated[
        bool,
        typer.Option(
            "--detach/--foreground",
            help="Run the API in the background (stop it with "
            "`pgfleet down`) or in this terminal (Ctrl-C stops it).",
        ),
    ] = False,
) -> None:
    """Start the embedded fleet (platform + one server per active region),
    or with external servers the routers of their regions, migrate the
    platform DB and serve the API and console."""
    s = load_settings()
    for warning in warn_weak_tls(s):
        err.print(Text.assemble(("warning:", "bold yellow"), " ", warning), highlight=False)
    try:
        if s.embedded:
            with out.status("starting the embedded PostgreSQL servers..."):
                fleet = EmbeddedFleet(s)
                servers = fleet.up()
            for srv in servers:
                where = srv.region or "platform DB"
                out.print(f"  [green]up[/] {srv.name:<18} {where:<16} 127.0.0.1:{srv.port}")
            _print_router_lines(fleet.routers.specs, "127.0.0.1")
            out.print(
                f"  TLS: servers verified with sslmode=verify-full against {fleet.ca.cert_path}",
                soft_wrap=True,
                highlight=False,
            )
        elif s.routers:
            # External servers: their regions' routers run on this host.
            with out.status("starting the routers for the external servers..."):
                fleet = EmbeddedFleet(s)
                fleet.start_routers()
            listening = "" if s.router_listen == s.router_host else f" on {s.router_listen}"
            _print_router_lines(fleet.routers.specs, s.router_host, listening)
            out.print(
                f"  TLS: clients verify the routers against {fleet.ca.cert_path}",
                soft_wrap=True,
                highlight=False,
            )
        with out.status("migrating the platform DB..."), Platform(s) as platform:
            platform.migrate()
            platform.sync_servers()
            with platform.db.connection() as conn:
                tenant_store.follow_servers(conn)
            # The routers learn whatever changed while they were down.
            routing.publish(platform, repair=True)
            tf = token_file(s)
            existing = tf.read_text().strip() if tf.exists() else None
            new_token = ensure_admin_token(platform, existing)
            if new_token:
                write_private(tf, new_token + "\n")
    except PgfleetError as e:
        fail(e.message)
    url = f"http://{s.api_host}:{s.api_port}"
    write_private(api_file(s), json.dumps({"url": url}) + "\n")
    token = token_file(s).read_text().strip()
    if detach:
        _start_detached(s, url)
    out.print(f"\npgfleet API: [bold]{url}[/]   (OpenAPI: {url}/docs)", soft_wrap=True)
    out.print(f"web console: [bold]{url}/[/]   (sign in with the admin token)", soft_wrap=True)
    out.print(f"admin token: [bold]{token}[/]  (also in {token_file(s)})", soft_wrap=True)
    if not detach:
        out.print("Ctrl-C stops the API; `pgfleet down` stops the servers too.\n")
        _serve(s)


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), or
    None if there is no such live process. A zombie (killed, not yet reaped)
    counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # zombie or dead
        return None
    return fields[19]  # starttime, field 22 of stat(5)


def _write_pid_file(s: Settings, pid: int) -> None:
    """The API's pid and its start time: a pid alone may be reused by
    another process after the API died."""
    f = pid_file(s)
    f.parent.mkdir(parents=True, exist_ok=True)
    write_private(f, json.dumps({"pid": pid, "started": _process_start(pid)}) + "\n")


def _api_pid(s: Settings) -> int | None:
    """The pid of the running API started from this data directory, or None."""
    f = pid_file(s)
    if not f.exists():
        return None
    try:
        raw = json.loads(f.read_text())
        pid, started = int(raw["pid"]), raw.get("started")
    except (ValueError, KeyError, TypeError):
        f.unlink(missing_ok=True)
        return None
    alive = _process_start(pid)
    if Path("/proc/self/stat").exists():
        ok = alive is not None and (started is None or alive == started)
    else:  # no /proc: the best a signal 0 can tell
        try:
            os.kill(pid, 0)
            ok = True
        except (ProcessLookupError, PermissionError):
            ok = False
    if not ok:
        f.unlink(missing_ok=True)
        return None
    return pid


def _listeners(port: int) -> list[int]:
    """Pids of the processes listening on TCP `port` (from /proc; empty
    where it cannot be read)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{parts[9]}]")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:
            continue
    return sorted(pids)


def _start_detached(s: Settings, url: str) -> None:
    if _api_pid(s) is not None:
        out.print("  API already running")
        return
    if not port_free(s.api_host, s.api_port):
        held = _listeners(s.api_port)
        who = f" by pid {', '.join(map(str, held))}" if held else ""
        fail(
            f"port {s.api_port} is in use{who}, so the API cannot start: stop what "
            "holds it, or set PGFLEET_API_PORT"
        )
    log = (s.home_abs / "api.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgfleet.cli", "serve"],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=os.environ.copy(),
    )
    _write_pid_file(s, proc.pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"the API exited at start; see {s.home_abs / 'api.log'}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    fail(f"the API did not answer within 30 s; see {s.home_abs / 'api.log'}")


def _serve(s: Settings) -> None:
    """Serve the API in this process (and its uvicorn workers). The pid file
    lets `pgfleet down` stop it from another terminal."""
    running = _api_pid(s)
    if running is not None and running != os.getpid():
        fail(
            f"an API from {s.home_abs} is already running (pid {running}); `pgfleet down` stops it"
        )
    _write_pid_file(s, os.getpid())
    try:
        _run_uvicorn(s)
    finally:
        if _api_pid(s) == os.getpid():
            pid_file(s).unlink(missing_ok=True)


# SIGTERM or Ctrl-C: requests still open after this many seconds are dropped,
# so the API stops within a few seconds whatever the platform DB is doing.
GRACEFUL_SHUTDOWN_S = 3


def _run_uvicorn(s: Settings) -> None:
    # The server stack (uvicorn, FastAPI, the app) is imported only by the
    # commands that serve, so client commands and --help start fast.
    import uvicorn

    from pgfleet.api import processes
    from pgfleet.api.app import create_app, proxy_options

    warn_weak_tls(s)

    if s.api_workers > 1:
        # Each worker process builds its own app (and Platform) from settings;
        # their metrics meet in one directory, emptied at each start.
        metrics_dir = s.home_abs / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ[MULTIPROC_ENV] = str(metrics_dir)
        options: dict[str, Any] = {
            "factory": True,
            "host": s.api_host,
            "port": s.api_port,
            "log_level": "warning",
            "access_log": False,
            "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
            **proxy_options(s),
        }
        if processes.spreads_connections():
            # Each process on a socket of its own (see api/processes.py).
            config = uvicorn.Config("pgfleet.api.app:create_app", **options)
            try:
                processes.serve(config, s.api_workers, s.api_stall_timeout_s)
            except OSError as e:
                fail(f"cannot listen on {s.api_host}:{s.api_port}: {e.strerror or e}")
            return
        uvicorn.run("pgfleet.api.app:create_app", workers=s.api_workers, **options)
        return
    uvicorn.run(
        create_app(settings=s),
        host=s.api_host,
        port=s.api_port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        **proxy_options(s),
    )


@app.command()
def serve() -> None:
    """Serve the API and console on PGFLEET_API_HOST:PGFLEET_API_PORT (no fleet
    management; `up` does both)."""
    _serve(load_settings())


@app.command()
def down() -> None:
    """Stop the API (whether `up --detach` or `up` in another terminal runs
    it) and every embedded server. Data stays in the data directory."""
    s = load_settings()
    pid = _api_pid(s)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACEFUL_SHUTDOWN_S + 12
        while _api_pid(s) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if _api_pid(s) is not None:
            os.kill(pid, signal.SIGKILL)
            out.print(f"  [red]killed[/] API (pid {pid}): it did not stop on SIGTERM")
        else:
            out.print(f"  [yellow]stopped[/] API (pid {pid})")
        pid_file(s).unlink(missing_ok=True)
    if s.embedded:
        fleet = EmbeddedFleet(s)
        try:
            routers = fleet.routers
            for spec in routers.specs:
                if routers.stop(spec):
                    out.print(f"  [yellow]stopped[/] router {spec.name}")
            for name in fleet.stop_scratch():
                out.print(f"  [yellow]stopped[/] the scratch instance of {name}")
            for st in fleet.states():
                if st.running:
                    fleet.stop(st.server)
                    out.print(f"  [yellow]stopped[/] {st.server.name}")
        except PgfleetError as e:
            fail(e.message)
    elif s.routers:
        routers = EmbeddedFleet(s).routers
        routers.close()
        for spec in routers.specs:
            if routers.stop(spec):
                out.print(f"  [yellow]stopped[/] router {spec.name}")
    out.print("pgfleet is down; data is kept in " + str(s.home_abs))


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """Each embedded server (region, port, up/down, round trip, connections
    used/max, tenant databases, disk used, WAL archiving), the routers, the
    base backups, the operations and the API."""
    s = load_settings()
    if not s.embedded:
        out.print("external servers are configured; see `GET /health` for their state")
        if s.routers:
            _print_routers(EmbeddedFleet(s))
        return
    states = EmbeddedFleet(s).states()
    if not states:
        fail(f"no embedded fleet in {s.home_abs}; run `pgfleet up`")
    fleet = EmbeddedFleet(s)
    if as_json:
        return print_json(_status_data(s, fleet))
    t = Table(title=f"pgfleet servers ({s.home_abs})")
    for col in ("server", "region", "port", "state"):
        t.add_column(col, no_wrap=True)
    for col in ("latency", "connections", "dbs", "size", "archiving"):
        t.add_column(col)
    for st in states:
        state = Text("up", "green") if st.running else Text("down", "red")
        cells: list[object] = ["-", "-", "-", "-", "-"]
        if st.running:
            h = _check(fleet, st.server)
            if h.ok:
                cells = [
                    f"{h.latency_ms} ms",
                    f"{h.connections_used}/{h.connections_max}",
                    h.tenant_databases,
                    size(h.bytes_used),
                    _archiving_cell(h.archive_mode, h.archive_failing, h.last_archived_at),
                ]
            else:
                state = Text("not answering", "red")
        add_row(
            t,
            st.server.name,
            st.server.region or "(platform DB)",
            str(st.server.port),
            state,
            *cells,
        )
    out.print(t)
    _print_routers(fleet)
    _print_base_backups(fleet)
    _print_operations_summary(s)
    pid = _api_pid(s)
    url = json.loads(api_file(s).read_text())["url"] if api_file(s).exists() else "-"
    out.print(f"API: {url} " + (f"(pid {pid})" if pid else "(not started by `up --detach`)"))


def _check(fleet: EmbeddedFleet, server: EmbeddedServer) -> ServerHealth:
    return check_server(
        ServerRecord(
            id=0,
            name=server.name,
            region=server.region or "platform",
            host="127.0.0.1",
            port=server.port,
            admin_user=ADMIN_USER,
            admin_database="pgfleet" if server.kind == "platform" else "postgres",
            sslmode="verify-full",
            sslrootcert=str(fleet.ca.cert_path),
            capacity=0,
            is_primary=True,
            enabled=True,
            embedded=True,
            admin_password=fleet.admin_password(server.name),
        )
    )


def _status_data(s: Settings, fleet: EmbeddedFleet) -> dict[str, object]:
    """What `status` shows, for `--json`."""
    servers = []
    for st in fleet.states():
        item: dict[str, object] = {
            "name": st.server.name,
            "kind": st.server.kind,
            "region": st.server.region,
            "port": st.server.port,
            "state": "up" if st.running else "down",
        }
        if st.running:
            h = _check(fleet, st.server)
            if not h.ok:
                item["state"] = "not answering"
            else:
                item.update(
                    latency_ms=h.latency_ms,
                    connections_used=h.connections_used,
                    connections_max=h.connections_max,
                    tenant_databases=h.tenant_databases,
                    bytes_used=h.bytes_used,
                    archiving={
                        "mode": h.archive_mode,
                        "failing": h.archive_failing,
                        "last_archived_at": h.last_archived_at,
                        "lag_bytes": h.archive_lag_bytes,
                    },
                )
        servers.append(item)
    routers = []
    r = fleet.routers
    try:
        for spec in r.specs:
            state = r.state(spec)
            loaded = None
            if state.running:
                try:
                    loaded = len(r.databases(spec))
                except (psycopg.Error, PgfleetError):
                    loaded = None
            routers.append(
                {
                    "name": spec.name,
                    "region": spec.region,
                    "pooling": spec.pool_mode,
                    "port": spec.port,
                    "state": "up" if state.running else "down",
                    "databases": loaded,
                }
            )
    finally:
        r.close()
    backups = []
    archive = fleet.archive
    if archive is not None:
        for name, stanza in archive.stanzas.items():
            entry: dict[str, object] = {"server": name, "stored_in": stanza.storage_region}
            try:
                info = archive.info(stanza)
                entry["base_backups"] = [
                    {"label": b.label, "type": b.type, "stopped_at": b.stopped_at}
                    for b in info.backups
                ]
            except FleetError as e:
                entry["error"] = str(e)
            backups.append(entry)
    try:
        with psycopg.connect(
            **{**platform_conninfo(s), "connect_timeout": 3}, autocommit=True
        ) as conn:
            ops: object = deadline_summary(conn, alive_within_s=s.worker_stalled_s)
    except (psycopg.Error, PgfleetError):
        ops = None
    pid = _api_pid(s)
    url = json.loads(api_file(s).read_text())["url"] if api_file(s).exists() else None
    return {
        "home": str(s.home_abs),
        "servers": servers,
        "routers": routers,
        "backups": backups,
        "operations": ops,
        "api": {"url": url, "pid": pid},
    }


def _archiving_cell(mode: str | None, failing: bool, last: datetime | None) -> Text:
    if mode != "on":
        return Text(mode or "-")
    when = f" (last {last:%H:%M:%S}Z)" if last else ""
    return Text("FAILING" + when, "red") if failing else Text("on" + when, "green")


def _print_base_backups(fleet: EmbeddedFleet) -> None:
    """Each regional server's backup region and newest base backup."""
    archive = fleet.archive
    if archive is None:
        out.print("backups: none (PGFLEET_BACKUPS=false)")
        return
    t = Table(title="base backups (pgBackRest; WAL is archived continuously)")
    for col in ("server", "stored in", "backups", "newest"):
        t.add_column(col, no_wrap=True)
    for name, stanza in archive.stanzas.items():
        try:
            info = archive.info(stanza)
            newest = info.newest
            shown = (
                f"{newest.label} ({newest.type}, {newest.stopped_at:%Y-%m-%d %H:%M}Z)"
                if newest
                else "none yet: the workers take the first one"
            )
            count = str(len(info.backups))
        except FleetError as e:
            shown, count = f"unreadable: {e}"[:80], "-"
        add_row(t, name, stanza.storage_region, count, shown)
    out.print(t)


def _print_routers(fleet: EmbeddedFleet) -> None:
    """Each router: region, pooling, port, running or not, databases loaded."""
    routers = fleet.routers
    if not routers.specs:
        out.print("routers: none (PGFLEET_ROUTERS=false)")
        return
    t = Table(title="routers (PgBouncer, <region>-<pooling>; connection strings point here)")
    for col in ("router", "port", "state", "databases"):
        t.add_column(col, no_wrap=True)
    try:
        _router_rows(t, routers)
    finally:
        routers.close()
    out.print(t)


def _router_rows(t: Table, routers: Routers) -> None:
    for spec in routers.specs:
        state = routers.state(spec)
        loaded = "-"
        if state.running:
            try:
                loaded = str(len(routers.databases(spec)))
                shown = Text("up", "green")
            except (psycopg.Error, PgfleetError):
                shown = Text("not answering", "red")
        else:
            shown = Text("down", "red")
        add_row(t, spec.name, str(spec.port), shown, loaded)


def _print_operations_summary(s: Settings) -> None:
    """Operations waiting, running, and past their deadline, from the platform DB."""
    try:
        conninfo = platform_conninfo(s)
        with psycopg.connect(**{**conninfo, "connect_timeout": 3}, autocommit=True) as conn:
            ops = deadline_summary(conn, alive_within_s=s.worker_stalled_s)
    except (psycopg.Error, PgfleetError):
        out.print("operations: platform DB not reachable")
        return
    line = (
        f"operations: {ops['scheduled']} scheduled, {ops['running']} running, "
        f"{ops['workers']} live worker(s)"
    )
    if ops["past_deadline"]:
        out.print(Text(f"{line}, {ops['past_deadline']} PAST THEIR DEADLINE:", "red"))
        for m in ops["missed"]:
            out.print(
                f"  {m['id']} {m['type']} ({m['status']}, step {m['current_step'] or '-'}) "
                f"deadline {m['deadline']:%Y-%m-%d %H:%M:%S}"
            )
    else:
        out.print(line)


@app.command("worker")
def worker_cmd(
    concurrency: Annotated[
        int | None, typer.Option(help="Operations run at once (default PGFLEET_WORKER_CONCURRENCY)")
    ] = None,
) -> None:
    """Run an operations worker in the foreground (any number can run beside
    the API's embedded ones; Ctrl-C stops it after its running steps)."""
    # Imported here for the same reason as the server stack in _run_uvicorn;
    # `domains` registers the domains' kinds and jobs (see its docstring).
    from pgfleet import domains
    from pgfleet.operations.worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warn_weak_tls(load_settings())
    with domains.attach(Platform(load_settings())) as platform:
        w = Worker(platform, concurrency=concurrency)
        out.print(f"worker {w.name} running (concurrency {w.concurrency})")
        w.run()
