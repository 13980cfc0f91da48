"""The pgfleet command line.

`up`, `down`, `status` and `serve` manage the embedded fleet and the API
process directly; every other command is a client of the REST API, so each
feature has one implementation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import psycopg
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pgfleet.config import Settings, get_settings
from pgfleet.crypto import write_private
from pgfleet.errors import PgfleetError
from pgfleet.platform.core import platform_conninfo, warn_weak_tls

app = typer.Typer(
    help="pgfleet: multi-region PostgreSQL databases for your projects.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
regions_app = typer.Typer(help="The region catalog.", no_args_is_help=True)
projects_app = typer.Typer(help="Create, list, show and delete projects.", no_args_is_help=True)
tokens_app = typer.Typer(help="Your API tokens.", no_args_is_help=True)
owners_app = typer.Typer(help="Owners (admin only).", no_args_is_help=True)
app.add_typer(regions_app, name="regions")
app.add_typer(projects_app, name="projects")
app.add_typer(tokens_app, name="tokens")
app.add_typer(owners_app, name="owners")
ops_app = typer.Typer(
    help="Operations: what pgfleet is doing or did to your projects.", no_args_is_help=True
)
app.add_typer(ops_app, name="ops")
stats_app = typer.Typer(help="Fleet statistics (admin).", no_args_is_help=True)
app.add_typer(stats_app, name="stats")

out = Console()
err = Console(stderr=True)

UrlOpt = Annotated[
    str | None,
    typer.Option("--url", envvar="PGFLEET_URL", help="API URL (default: from the data dir)"),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="PGFLEET_TOKEN",
        help="API token (default: the data dir's admin token)",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the raw JSON response.")]
WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait/--no-wait",
        help="Wait for the operation to end, or return at once with its id "
        "(follow it with `pgfleet ops watch ID`).",
    ),
]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)
    raise typer.Exit(code)


def _settings() -> Settings:
    try:
        return get_settings()
    except Exception as e:  # pydantic ValidationError: show it plainly
        fail(f"invalid settings: {e}")


# ---- files in the data directory -------------------------------------------


def _api_file(s: Settings) -> Path:
    return s.home_abs / "api.json"


def _token_file(s: Settings) -> Path:
    return s.home_abs / "admin-token"


def _pid_file(s: Settings) -> Path:
    return s.home_abs / "api.pid"


# ---- the REST client -------------------------------------------------------


class Client:
    def __init__(self, url: str | None, token: str | None) -> None:
        s = _settings()
        if url is None:
            f = _api_file(s)
            url = (
                json.loads(f.read_text())["url"]
                if f.exists()
                else f"http://{s.api_host}:{s.api_port}"
            )
        if token is None and _token_file(s).exists():
            token = _token_file(s).read_text().strip()
        if not token:
            fail(
                "no API token: pass --token, set PGFLEET_TOKEN, or run `pgfleet up` "
                "to create the admin token"
            )
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            with httpx.Client(base_url=self.url, timeout=60, headers=self.headers) as http:
                r = http.request(method, path, **kw)
        except httpx.TransportError:
            fail(f"cannot reach the pgfleet API at {self.url}; is it running (`pgfleet up`)?")
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text[:500]
            fail(f"{msg} (HTTP {r.status_code})")
        return r.json() if r.content else None


def _row(table: Table, *cells: object) -> None:
    """Add a row whose cells are shown as plain text, never as Rich markup."""
    table.add_row(*[c if isinstance(c, Text) else Text(str(c)) for c in cells])


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ---- fleet management ------------------------------------------------------


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
    migrate the platform DB and serve the API and console."""
    from pgfleet.auth import ensure_admin_token
    from pgfleet.fleet.embedded import EmbeddedFleet
    from pgfleet.platform.core import Platform

    s = _settings()
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
            out.print(
                f"  TLS: servers verified with sslmode=verify-full against {fleet.ca.cert_path}",
                soft_wrap=True,
                highlight=False,
            )
        with out.status("migrating the platform DB..."), Platform(s) as platform:
            platform.migrate()
            platform.sync_servers()
            tf = _token_file(s)
            existing = tf.read_text().strip() if tf.exists() else None
            new_token = ensure_admin_token(platform, existing)
            if new_token:
                write_private(tf, new_token + "\n")
    except PgfleetError as e:
        fail(e.message)
    url = f"http://{s.api_host}:{s.api_port}"
    write_private(_api_file(s), json.dumps({"url": url}) + "\n")
    token = _token_file(s).read_text().strip()
    if detach:
        _start_detached(s, url)
    out.print(f"\npgfleet API: [bold]{url}[/]   (OpenAPI: {url}/docs)", soft_wrap=True)
    out.print(f"web console: [bold]{url}/[/]   (sign in with the admin token)", soft_wrap=True)
    out.print(f"admin token: [bold]{token}[/]  (also in {_token_file(s)})", soft_wrap=True)
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
    f = _pid_file(s)
    f.parent.mkdir(parents=True, exist_ok=True)
    write_private(f, json.dumps({"pid": pid, "started": _process_start(pid)}) + "\n")


def _api_pid(s: Settings) -> int | None:
    """The pid of the running API started from this data directory, or None."""
    f = _pid_file(s)
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


def _start_detached(s: Settings, url: str) -> None:
    if _api_pid(s) is not None:
        out.print("  API already running")
        return
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
            _pid_file(s).unlink(missing_ok=True)


# SIGTERM or Ctrl-C: requests still open after this many seconds are dropped,
# so the API stops within a few seconds whatever the platform DB is doing.
GRACEFUL_SHUTDOWN_S = 3


def _run_uvicorn(s: Settings) -> None:
    import uvicorn

    warn_weak_tls(s)
    from pgfleet.api.app import create_app

    if s.api_workers > 1:
        # Each worker process builds its own app (and Platform) from settings;
        # their metrics meet in one directory, emptied at each start.
        from pgfleet.monitoring.metrics import MULTIPROC_ENV

        metrics_dir = s.home_abs / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ[MULTIPROC_ENV] = str(metrics_dir)
        uvicorn.run(
            "pgfleet.api.app:create_app",
            factory=True,
            host=s.api_host,
            port=s.api_port,
            workers=s.api_workers,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        return
    uvicorn.run(
        create_app(settings=s),
        host=s.api_host,
        port=s.api_port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


@app.command()
def serve() -> None:
    """Serve the API and console on PGFLEET_API_HOST:PGFLEET_API_PORT (no fleet
    management; `up` does both)."""
    _serve(_settings())


@app.command()
def down() -> None:
    """Stop the API (whether `up --detach` or `up` in another terminal runs
    it) and every embedded server. Data stays in the data directory."""
    from pgfleet.fleet.embedded import EmbeddedFleet

    s = _settings()
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
        _pid_file(s).unlink(missing_ok=True)
    if s.embedded:
        fleet = EmbeddedFleet(s)
        try:
            for st in fleet.states():
                if st.running:
                    fleet.stop(st.server)
                    out.print(f"  [yellow]stopped[/] {st.server.name}")
        except PgfleetError as e:
            fail(e.message)
    out.print("pgfleet is down; data is kept in " + str(s.home_abs))


@app.command()
def status() -> None:
    """Each embedded server (region, port, up/down, round trip, connections
    used/max, tenant databases, disk used) and the API."""
    from pgfleet.fleet.embedded import ADMIN_USER, EmbeddedFleet
    from pgfleet.fleet.health import check_server
    from pgfleet.fleet.registry import ServerRecord

    s = _settings()
    if not s.embedded:
        out.print("external servers are configured; see `GET /health` for their state")
        return
    states = EmbeddedFleet(s).states()
    if not states:
        fail(f"no embedded fleet in {s.home_abs}; run `pgfleet up`")
    fleet = EmbeddedFleet(s)
    t = Table(title=f"pgfleet servers ({s.home_abs})")
    for col in ("server", "region", "port", "state"):
        t.add_column(col, no_wrap=True)
    for col in ("latency", "connections", "dbs", "size"):
        t.add_column(col)
    for st in states:
        state = Text("up", "green") if st.running else Text("down", "red")
        cells: list[object] = ["-", "-", "-", "-"]
        if st.running:
            h = check_server(
                ServerRecord(
                    id=0,
                    name=st.server.name,
                    region=st.server.region or "platform",
                    host="127.0.0.1",
                    port=st.server.port,
                    admin_user=ADMIN_USER,
                    admin_database="pgfleet" if st.server.kind == "platform" else "postgres",
                    sslmode="verify-full",
                    sslrootcert=str(fleet.ca.cert_path),
                    capacity=0,
                    is_primary=True,
                    enabled=True,
                    embedded=True,
                    admin_password=fleet.admin_password(st.server.name),
                )
            )
            if h.ok:
                cells = [
                    f"{h.latency_ms} ms",
                    f"{h.connections_used}/{h.connections_max}",
                    h.tenant_databases,
                    _bytes(h.bytes_used),
                ]
            else:
                state = Text("not answering", "red")
        _row(
            t,
            st.server.name,
            st.server.region or "(platform DB)",
            str(st.server.port),
            state,
            *cells,
        )
    out.print(t)
    _print_operations_summary(s)
    pid = _api_pid(s)
    url = json.loads(_api_file(s).read_text())["url"] if _api_file(s).exists() else "-"
    out.print(f"API: {url} " + (f"(pid {pid})" if pid else "(not started by `up --detach`)"))


def _print_operations_summary(s: Settings) -> None:
    """Operations waiting, running, and past their deadline, from the platform DB."""
    from pgfleet.operations.store import deadline_summary

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


# ---- regions ---------------------------------------------------------------


@regions_app.command("list")
def regions_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """The six regions: id, name, flag, status and server count."""
    data = Client(url, token).call("GET", "/v1/regions")
    if as_json:
        return _print_json(data)
    t = Table(title="Regions")
    for col in ("id", "name", "flag", "status", "servers"):
        t.add_column(col)
    for r in data:
        status_txt = r["status"] + (" (default)" if r["default"] else "")
        _row(t, r["id"], r["name"], r["flag"], status_txt, str(r["server_count"]))
    out.print(t)


# ---- projects --------------------------------------------------------------


def _project_table(p: dict[str, Any]) -> Table:
    t = Table(show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column()
    region = f"{p['region_flag'] or ''} {p['region']}".strip()
    hosted = f"{p['hosted_region_flag'] or ''} {p['hosted_region'] or '-'}".strip()
    rows = [
        ("id", p["id"]),
        ("name", p["name"]),
        ("subdomain", p["subdomain"] or "-"),
        ("region", region),
        ("hosted in", hosted),
        ("server", p["server"] or "-"),
        ("placement", p["placement_reason"] or "-"),
        ("plan", p["plan_type"] or "-"),
        ("status", p["status"]),
        ("created", p["created_at"] or "-"),
    ]
    if p.get("error"):
        rows.append(("error", p["error"]))
    if p.get("deleted_at"):
        rows.append(("deleted", p["deleted_at"]))
    for k, v in rows:
        _row(t, k, str(v))
    return t


@projects_app.command("create")
def projects_create(
    name: Annotated[str, typer.Option(help="Project name")],
    region: Annotated[str, typer.Option(help="Requested region id")] = "us-east-1",
    plan: Annotated[str, typer.Option(help="Plan: free, pro, enterprise")] = "free",
    subdomain: Annotated[str | None, typer.Option(help="DNS label; derived if omitted")] = None,
    wait: WaitOpt = True,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a project and its database; prints the connection string."""
    body = {"name": name, "region": region, "plan_type": plan, "subdomain": subdomain}
    data = Client(url, token).call(
        "POST", "/v1/projects", json=body, params={"wait": str(wait).lower()}
    )
    if as_json:
        return _print_json(data)
    if "project" in data:  # 202: still provisioning
        out.print(_project_table(data["project"]))
        _print_started(data["operation"])
        return
    out.print(_project_table(data))
    out.print()
    out.print(
        Text.assemble(("connection: ", "bold"), data["connection"]["uri"]),
        soft_wrap=True,
        highlight=False,
    )


@projects_app.command("list")
def projects_list(
    region: Annotated[str | None, typer.Option(help="Only this requested region")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Include deleted projects")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Your projects (an admin token sees all)."""
    params: dict[str, Any] = {"include_deleted": all_}
    if region:
        params["region"] = region
    data = Client(url, token).call("GET", "/v1/projects", params=params)
    if as_json:
        return _print_json(data)
    t = Table(title="Projects")
    for col in ("id", "name", "region", "hosted in", "plan", "status", "created"):
        t.add_column(col)
    for p in data["projects"]:
        hosted = p["hosted_region"] or "-"
        _row(
            t,
            p["id"],
            p["name"],
            f"{p['region_flag'] or ''} {p['region']}",
            hosted,
            p["plan_type"] or "-",
            p["status"],
            (p["created_at"] or "")[:19],
        )
    out.print(t)


@projects_app.command("show")
def projects_show(
    project_id: str, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """One project: requested and hosting region, server, plan, status."""
    data = Client(url, token).call("GET", f"/v1/projects/{project_id}")
    if as_json:
        return _print_json(data)
    out.print(_project_table(data))


@projects_app.command("delete")
def projects_delete(
    project_id: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    wait: WaitOpt = True,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete a project: drops its database and role."""
    if not yes and sys.stdin.isatty():
        typer.confirm(
            f"Drop the database of project {project_id}? This cannot be undone", abort=True
        )
    data = Client(url, token).call(
        "DELETE", f"/v1/projects/{project_id}", params={"wait": str(wait).lower()}
    )
    _print_started(data["operation"], data["project"])


def _print_started(op: dict[str, Any], project: dict[str, Any] | None = None) -> None:
    if project is not None:
        out.print(f"project {project['id']} is {project['status']}")
    out.print(f"operation {op['id']} ({op['type']}) is {op['status']}")
    if op["status"] in ("scheduled", "running"):
        out.print(f"follow it with: pgfleet ops watch {op['id']}")
    elif op["status"] == "failed":
        fail(f"operation {op['id']} failed: {op['error']}")


def _lifecycle(
    path: str, url: str | None, token: str | None, wait: bool, as_json: bool, body: Any = None
) -> dict[str, Any]:
    data: dict[str, Any] = Client(url, token).call(
        "POST", path, json=body, params={"wait": str(wait).lower()}
    )
    if as_json:
        _print_json(data)
    else:
        _print_started(data["operation"], data["project"])
    return data


@projects_app.command("rotate-password")
def projects_rotate(
    project_id: str,
    role: Annotated[str, typer.Option(help="all, rw or ro")] = "all",
    overlap: Annotated[
        int,
        typer.Option(
            help="Seconds the old credentials keep working (the new ones then use the "
            "project's other login role)"
        ),
    ] = 0,
    wait: WaitOpt = True,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """New passwords for the project's login roles; the old ones stop working
    at once, or after --overlap seconds."""
    data = _lifecycle(
        f"/v1/projects/{project_id}/rotate-password",
        url,
        token,
        wait,
        as_json,
        {"role": role, "overlap_s": overlap},
    )
    if not as_json and data.get("connection"):
        out.print(
            Text.assemble(("connection: ", "bold"), data["connection"]["uri"]),
            soft_wrap=True,
            highlight=False,
        )


@projects_app.command("pause")
def projects_pause(
    project_id: str,
    wait: WaitOpt = True,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Refuse new connections and end open ones; data is kept."""
    _lifecycle(f"/v1/projects/{project_id}/pause", url, token, wait, as_json)


@projects_app.command("resume")
def projects_resume(
    project_id: str,
    wait: WaitOpt = True,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Accept connections again."""
    _lifecycle(f"/v1/projects/{project_id}/resume", url, token, wait, as_json)


@projects_app.command("plan")
def projects_plan(
    project_id: str,
    plan: Annotated[str, typer.Argument(help="free, pro or enterprise")],
    wait: WaitOpt = True,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change the project's plan (limits applied at once; says if it would move)."""
    data = _lifecycle(f"/v1/projects/{project_id}/plan", url, token, wait, as_json, {"plan": plan})
    placement = ((data["operation"].get("result") or {}).get("placement")) or {}
    if not as_json and placement:
        out.print(f"placement: {placement['note']}")


@projects_app.command("audit")
def projects_audit(
    project_id: str,
    limit: Annotated[int, typer.Option(help="How many entries")] = 50,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Who did what to the project, newest first."""
    data = Client(url, token).call(
        "GET", f"/v1/projects/{project_id}/audit", params={"limit": limit}
    )
    _print_audit(data, as_json)


def _print_audit(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        return _print_json(data)
    t = Table(title="Audit log")
    for col in ("at", "actor", "action", "project", "operation", "details"):
        t.add_column(col)
    for e in data["entries"]:
        _row(
            t,
            e["at"][:19],
            e["actor"],
            e["action"],
            e["project_id"] or "-",
            e["operation_id"] or "-",
            json.dumps(e["details"], ensure_ascii=False),
        )
    out.print(t)


@projects_app.command("connection")
def projects_connection(
    project_id: str,
    mode: Annotated[str, typer.Option(help="rw or ro")] = "rw",
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the project's connection string (rw or ro)."""
    data = Client(url, token).call(
        "GET", f"/v1/projects/{project_id}/connection", params={"mode": mode}
    )
    if as_json:
        return _print_json(data)
    sys.stdout.write(data["uri"] + "\n")


# ---- tokens and owners -----------------------------------------------------


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Option(help="A label")] = "cli",
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create a token for yourself; it is shown once."""
    data = Client(url, token).call("POST", "/v1/tokens", json={"name": name})
    out.print(
        f"token {data['id']} ({escape(data['name'])}): [bold]{data['token']}[/]", soft_wrap=True
    )
    out.print("Store it now: it is not shown again.")


@tokens_app.command("list")
def tokens_list(url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Your tokens (prefix only)."""
    data = Client(url, token).call("GET", "/v1/tokens")
    t = Table(title="Tokens")
    for col in ("id", "name", "prefix", "created", "last used", "revoked"):
        t.add_column(col)
    for r in data:
        _row(
            t,
            r["id"],
            r["name"],
            r["token_prefix"] + "...",
            r["created_at"][:19],
            (r["last_used_at"] or "-")[:19],
            (r["revoked_at"] or "-")[:19],
        )
    out.print(t)


@tokens_app.command("revoke")
def tokens_revoke(token_id: str, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Revoke one of your tokens."""
    Client(url, token).call("DELETE", f"/v1/tokens/{token_id}")
    out.print(f"token {escape(token_id)} revoked")


@owners_app.command("create")
def owners_create(
    name: str,
    admin: Annotated[bool, typer.Option(help="Make an admin")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an owner and print its first token (shown once)."""
    data = Client(url, token).call(
        "POST", "/v1/admin/owners", json={"name": name, "is_admin": admin}
    )
    if as_json:
        return _print_json(data)
    out.print(f"owner {data['owner']['id']} ({escape(data['owner']['name'])})")
    out.print(f"token: [bold]{data['token']}[/]  (shown once)", soft_wrap=True)


@owners_app.command("list")
def owners_list(url: UrlOpt = None, token: TokenOpt = None) -> None:
    """All owners with their project counts."""
    data = Client(url, token).call("GET", "/v1/admin/owners")
    t = Table(title="Owners")
    for col in ("id", "name", "admin", "projects", "created"):
        t.add_column(col)
    for r in data:
        _row(
            t,
            r["id"],
            r["name"],
            "yes" if r["is_admin"] else "",
            str(r["projects"]),
            r["created_at"][:19],
        )
    out.print(t)


# ---- SQL, stats, advisor, costs --------------------------------------------


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, dict | list):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


@app.command("sql")
def sql_cmd(
    project_id: Annotated[str, typer.Argument(help="Project id")],
    query: Annotated[str, typer.Argument(help="One SQL statement; $1, $2... for --param")],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="A value for $1, $2... (repeat)")
    ] = None,
    mode: Annotated[str, typer.Option(help="rw, or ro for the read-only role")] = "rw",
    timeout_ms: Annotated[int | None, typer.Option(help="Statement timeout in ms")] = None,
    max_rows: Annotated[int | None, typer.Option(help="Rows to return at most")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run one statement as the project's role and print the result."""
    body: dict[str, Any] = {"query": query, "params": param or [], "mode": mode}
    if timeout_ms is not None:
        body["timeout_ms"] = timeout_ms
    if max_rows is not None:
        body["max_rows"] = max_rows
    client = Client(url, token)
    with httpx.Client(base_url=client.url, timeout=600, headers=client.headers) as http:
        try:
            r = http.post(f"/v1/projects/{project_id}/sql", json=body)
        except httpx.TransportError:
            fail(f"cannot reach the pgfleet API at {client.url}; is it running (`pgfleet up`)?")
    data = r.json() if r.content else {}
    if r.status_code >= 400:
        if as_json:
            _print_json(data)
            raise typer.Exit(1)
        e = data.get("error", {}) if isinstance(data, dict) else {}
        msg = e.get("message") or r.text[:500]
        extra = []
        if e.get("sqlstate"):
            extra.append(f"SQLSTATE {e['sqlstate']}")
        if e.get("position"):
            extra.append(f"at character {e['position']}")
        fail(msg + (f" ({', '.join(extra)})" if extra else f" (HTTP {r.status_code})"))
    if as_json:
        return _print_json(data)
    if data["columns"]:
        t = Table(show_lines=False)
        for c in data["columns"]:
            t.add_column(Text(f"{c['name']}\n{c['type']}"))
        for row in data["rows"]:
            _row(t, *[_cell(v) for v in row])
        out.print(t)
    more = " (truncated)" if data["truncated"] else ""
    out.print(
        Text(f"{data['command']}: {data['row_count']} row(s){more} in {data['duration_ms']} ms")
    )


@stats_app.command("regions")
def stats_regions(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Tenants per region: free/paid, status, share, hosted elsewhere, servers."""
    data = Client(url, token).call("GET", "/v1/admin/stats/regions")
    if as_json:
        return _print_json(data)
    t = Table(title=f"Regions ({data['total_tenants']} projects)")
    for col in (
        "region",
        "status",
        "projects",
        "free/paid",
        "act/paus/fail",
        "share",
        "hosted",
        "servers",
        "size",
    ):
        t.add_column(col)
    for r in data["regions"]:
        _row(
            t,
            f"{r['flag']} {r['region']}",
            r["status"],
            r["tenants"],
            f"{r['free']}/{r['paid']}",
            f"{r['active']}/{r['paused']}/{r['failed']}",
            f"{r['share']:.0%}",
            r["hosted"],
            len(r["servers"]),
            _bytes(r["bytes"]),
        )
    out.print(t)
    out.print(f"{data['requested_not_hosted']} project(s) picked a region that does not host them")


def _bytes(n: int | None) -> str:
    if not n:
        return "-"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.0f} PB"


@stats_app.command("performance")
def stats_performance(
    window: Annotated[str, typer.Option(help="e.g. 30m, 24h, 7d")] = "24h",
    by: Annotated[str, typer.Option(help="region or hosted_region")] = "region",
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per region and route: queries, error rate, avg and p50/p95/p99 (ms)."""
    data = Client(url, token).call(
        "GET", "/v1/admin/stats/performance", params={"window": window, "by": by}
    )
    if as_json:
        return _print_json(data)
    exact = "" if data["exact"] else " (percentiles from histograms)"
    t = Table(title=f"Query performance, last {window}{exact}")
    for col in (by, "route", "queries", "errors", "avg ms", "p50 ms", "p95 ms", "p99 ms"):
        t.add_column(col)
    for r in data["rows"]:
        _row(
            t,
            r[by],
            r["route"],
            r["queries"],
            f"{r['error_rate']:.1%}",
            r["avg_ms"],
            r["p50_ms"],
            r["p95_ms"],
            r["p99_ms"],
        )
    out.print(t)


@app.command()
def advisor(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Where to deploy the next server, and why (admin)."""
    data = Client(url, token).call("GET", "/v1/admin/advisor")
    if as_json:
        return _print_json(data)
    recs = data["recommendations"]
    if not recs:
        s = data["settings"]
        out.print(
            f"No recommendation: {data['total_tenants']} project(s); the rule needs at least "
            f"{s['min_sample']} and {s['share_threshold']:.0%} in one region without a server."
        )
        return
    t = Table(title="Advisor")
    for col in ("action", "region", "why"):
        t.add_column(col)
    for r in recs:
        _row(t, r["kind"].replace("_", " "), r["region"], r["reason"])
    out.print(t)


@app.command()
def costs(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Monthly cost per region and the seed's expansion options (admin)."""
    data = Client(url, token).call("GET", "/v1/admin/costs")
    if as_json:
        return _print_json(data)
    cur = data["currency"]
    t = Table(title=f"Monthly cost per region ({cur})")
    for col in ("region", "servers", "projects", "monthly", "per project"):
        t.add_column(col)
    for r in data["regions"]:
        _row(
            t,
            r["region"],
            r["servers"],
            r["tenants"],
            f"{r['monthly']:.2f}",
            "-" if r["per_tenant"] is None else f"{r['per_tenant']:.2f}",
        )
    out.print(t)
    o = Table(title=f"Options ({cur}/month)")
    for col in ("option", "monthly", "what"):
        o.add_column(col)
    for r in data["options"]:
        high = f" - {r['monthly_high']:.2f}" if r["monthly_high"] is not None else ""
        _row(o, r["name"], f"{r['monthly']:.2f}{high}", r["description"])
    out.print(o)


def main() -> None:
    app()


if __name__ == "__main__":
    main()


# ---- operations ------------------------------------------------------------


def _op_table(op: dict[str, Any]) -> Table:
    t = Table(show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column()
    rows: list[tuple[str, object]] = [
        ("id", op["id"]),
        ("type", op["type"]),
        ("status", _op_status(op)),
        ("project", op["project_id"] or "-"),
        ("by", op["actor"] or "-"),
        ("step", op["current_step"] or "-"),
        ("attempts", op["attempts"]),
        ("created", op["created_at"][:23]),
        ("started", (op["started_at"] or "-")[:23]),
        ("finished", (op["finished_at"] or "-")[:23]),
        ("duration", f"{op['duration_ms']} ms" if op["duration_ms"] is not None else "-"),
        ("deadline", op["deadline"][:19] + (" (missed)" if op["deadline_missed"] else "")),
    ]
    if op["cancel_requested"]:
        rows.append(("cancel", "requested"))
    if op["error"]:
        rows.append(("error", Text(op["error"], "red")))
    for k, v in rows:
        _row(t, k, v)
    return t


def _op_status(op: dict[str, Any]) -> Text:
    colour = {"finished": "green", "failed": "red", "cancelled": "yellow"}.get(op["status"], "cyan")
    return Text(op["status"], colour)


def _steps_table(op: dict[str, Any]) -> Table:
    t = Table(title="Steps")
    for col in ("#", "step", "status", "attempts", "duration", "error"):
        t.add_column(col)
    for st in op["steps"]:
        _row(
            t,
            st["position"] + 1,
            st["name"],
            st["status"],
            st["attempts"],
            f"{st['duration_ms']} ms" if st["duration_ms"] is not None else "-",
            st["error"] or "",
        )
    return t


@ops_app.command("show")
def ops_show(
    operation_id: str, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """One operation: status, steps with their durations, attempts, error."""
    data = Client(url, token).call("GET", f"/v1/operations/{operation_id}")
    if as_json:
        return _print_json(data)
    out.print(_op_table(data))
    if data["steps"]:
        out.print(_steps_table(data))


@ops_app.command("list")
def ops_list(
    project: Annotated[str | None, typer.Option(help="Only this project's operations")] = None,
    status: Annotated[
        str | None, typer.Option(help="scheduled, running, finished, failed or cancelled")
    ] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first")] = 20,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Operations, newest first (yours; an admin sees all)."""
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    path = f"/v1/projects/{project}/operations" if project else "/v1/operations"
    data = Client(url, token).call("GET", path, params=params)
    if as_json:
        return _print_json(data)
    t = Table(title="Operations")
    for col in ("id", "type", "status", "project", "step", "created", "duration", "error"):
        t.add_column(col)
    for op in data["operations"]:
        _row(
            t,
            op["id"],
            op["type"],
            _op_status(op),
            op["project_id"] or "-",
            op["current_step"] or "-",
            op["created_at"][:19],
            f"{op['duration_ms']} ms" if op["duration_ms"] is not None else "-",
            (op["error"] or "")[:60],
        )
    out.print(t)


@ops_app.command("watch")
def ops_watch(
    operation_id: str,
    interval: Annotated[float, typer.Option(help="Seconds between polls")] = 0.3,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds")] = 600,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Follow one operation live, step by step, until it ends."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    client = Client(url, token)
    op = client.call("GET", f"/v1/operations/{operation_id}")
    done_states = ("finished", "failed", "cancelled")
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        console=out,
        transient=False,
    ) as progress:
        task = progress.add_task(f"{op['type']} {op['status']}", total=None)
        end = time.monotonic() + timeout
        while True:
            finished = sum(1 for st in op["steps"] if st["status"] == "finished")
            total = max(len(op["steps"]), finished) or None
            if op["status"] == "finished":
                total = finished
            step = op["current_step"] or "-"
            progress.update(
                task,
                description=f"{op['type']} {op['status']} (step {step})",
                completed=finished,
                total=total,
            )
            if op["status"] in done_states or time.monotonic() > end:
                break
            time.sleep(interval)
            op = client.call("GET", f"/v1/operations/{operation_id}")
    out.print(_op_table(op))
    if op["steps"]:
        out.print(_steps_table(op))
    if op["status"] == "failed":
        raise typer.Exit(1)
    if op["status"] not in done_states:
        fail(f"operation {operation_id} is still {op['status']} after {timeout:g} s")


@ops_app.command("cancel")
def ops_cancel(
    operation_id: str, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Cancel a scheduled or running operation (undone at its next step)."""
    data = Client(url, token).call("POST", f"/v1/operations/{operation_id}/cancel")
    if as_json:
        return _print_json(data)
    note = " (cancel requested; it stops at its next step)" if data["status"] == "running" else ""
    out.print(f"operation {data['id']} is {data['status']}{note}")


@app.command("audit")
def audit_cmd(
    limit: Annotated[int, typer.Option(help="How many entries")] = 50,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The audit log across all projects (admin)."""
    data = Client(url, token).call("GET", "/v1/admin/audit", params={"limit": limit})
    _print_audit(data, as_json)


@app.command("reconcile")
def reconcile_cmd(
    repair: Annotated[bool, typer.Option(help="Fix what is found, not only report it")] = False,
    force: Annotated[
        bool, typer.Option(help="With --repair: also drop orphan databases that hold data")
    ] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare the platform DB with every regional server (admin): orphan
    databases and roles, missing or misconfigured project databases."""
    if force and not repair:
        fail("--force only makes sense with --repair")
    data = Client(url, token).call(
        "POST", "/v1/admin/reconcile", json={"repair": repair, "force": force}
    )
    if as_json:
        return _print_json(data)
    findings = data["findings"]
    if not findings:
        out.print(
            f"no differences: {data['servers_checked']} server(s) checked "
            f"in {data['duration_ms']} ms"
        )
        return
    t = Table(title=f"Reconciler findings ({'repair' if repair else 'report only'})")
    for col in ("kind", "server", "object", "detail", "repaired", "action"):
        t.add_column(col)
    for f in findings:
        _row(
            t,
            f["kind"],
            f["server"] or "-",
            f["object"],
            f["detail"],
            "yes" if f["repaired"] else "no",
            f["action"] or "-",
        )
    out.print(t)
    if not repair:
        out.print("run with --repair to fix them")


@app.command("worker")
def worker_cmd(
    concurrency: Annotated[
        int | None, typer.Option(help="Operations run at once (default PGFLEET_WORKER_CONCURRENCY)")
    ] = None,
) -> None:
    """Run an operations worker in the foreground (any number can run beside
    the API's embedded ones; Ctrl-C stops it after its running steps)."""
    import logging

    from pgfleet.operations import kinds as _kinds  # noqa: F401
    from pgfleet.operations.queue import Worker
    from pgfleet.platform.core import Platform

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warn_weak_tls(_settings())
    with Platform(_settings()) as platform:
        w = Worker(platform, concurrency=concurrency)
        out.print(f"worker {w.name} running (concurrency {w.concurrency})")
        w.run()
