"""The pgfleet command line.

`up`, `down`, `status` and `serve` manage the embedded fleet and the API
process directly; every other command is a client of the REST API, so each
feature has one implementation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pgfleet.config import Settings, get_settings
from pgfleet.crypto import write_private
from pgfleet.errors import PgfleetError

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
    try:
        if s.embedded:
            with out.status("starting the embedded PostgreSQL servers..."):
                servers = EmbeddedFleet(s).up()
            for srv in servers:
                where = srv.region or "platform DB"
                out.print(f"  [green]up[/] {srv.name:<18} {where:<16} 127.0.0.1:{srv.port}")
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
    out.print(f"admin token: [bold]{token}[/]  (also in {_token_file(s)})", soft_wrap=True)
    if not detach:
        out.print("Ctrl-C stops the API; `pgfleet down` stops the servers too.\n")
        _serve(s)


def _api_pid(s: Settings) -> int | None:
    f = _pid_file(s)
    if not f.exists():
        return None
    pid = int(f.read_text().strip() or 0)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
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
    _pid_file(s).write_text(f"{proc.pid}\n")
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
    import uvicorn

    from pgfleet.api.app import create_app

    if s.api_workers > 1:
        # Each worker process builds its own app (and Platform) from settings.
        uvicorn.run(
            "pgfleet.api.app:create_app",
            factory=True,
            host=s.api_host,
            port=s.api_port,
            workers=s.api_workers,
            log_level="warning",
            access_log=False,
        )
        return
    uvicorn.run(
        create_app(settings=s),
        host=s.api_host,
        port=s.api_port,
        log_level="warning",
        access_log=False,
    )


@app.command()
def serve() -> None:
    """Serve the API and console on PGFLEET_API_HOST:PGFLEET_API_PORT (no fleet
    management; `up` does both)."""
    _serve(_settings())


@app.command()
def down() -> None:
    """Stop the API (if `up --detach` started it) and every embedded server.
    Data stays in the data directory."""
    from pgfleet.fleet.embedded import EmbeddedFleet

    s = _settings()
    pid = _api_pid(s)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if _api_pid(s) is None:
                break
            time.sleep(0.1)
        _pid_file(s).unlink(missing_ok=True)
        out.print("  [yellow]stopped[/] API")
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
                    admin_database="postgres",
                    sslmode="disable",
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
    pid = _api_pid(s)
    url = json.loads(_api_file(s).read_text())["url"] if _api_file(s).exists() else "-"
    out.print(f"API: {url} " + (f"(pid {pid})" if pid else "(not started by `up --detach`)"))


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
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a project and its database; prints the connection string."""
    body = {"name": name, "region": region, "plan_type": plan, "subdomain": subdomain}
    data = Client(url, token).call("POST", "/v1/projects", json=body)
    if as_json:
        return _print_json(data)
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
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete a project: drops its database and role."""
    if not yes and sys.stdin.isatty():
        typer.confirm(
            f"Drop the database of project {project_id}? This cannot be undone", abort=True
        )
    data = Client(url, token).call("DELETE", f"/v1/projects/{project_id}")
    out.print(f"project {data['id']} is {data['status']}")


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
