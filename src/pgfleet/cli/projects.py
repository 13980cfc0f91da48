"""Projects: create, list, show, delete, the lifecycle, connection strings."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from pgfleet.cli.common import (
    Client,
    JsonOpt,
    ProjectArg,
    TokenOpt,
    UrlOpt,
    WaitOpt,
    add_row,
    confirm,
    fail,
    list_table,
    out,
    print_audit,
    print_json,
    projects_app,
    shown_id,
)
from pgfleet.cli.ops import DONE_STATES, follow
from pgfleet.display import size, when

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
        ("residency", p.get("residency") or "none"),
        ("status", p["status"]),
        ("created", when(p["created_at"])),
    ]
    if p.get("error"):
        rows.append(("error", p["error"]))
    if p.get("deleted_at"):
        rows.append(("deleted", when(p["deleted_at"])))
    if p.get("restored_from"):
        src = p["restored_from"]
        what = src.get("backup_id") or src.get("target_time") or "-"
        rows.append(("restored from", f"{src.get('project_id')} at {what}"))
    for k, v in rows:
        add_row(t, k, str(v))
    return t


@projects_app.command("create")
def projects_create(
    name: Annotated[str, typer.Option(help="Project name")],
    region: Annotated[str, typer.Option(help="Requested region id")] = "us-east-1",
    plan: Annotated[str, typer.Option(help="Plan: free, pro, enterprise")] = "free",
    subdomain: Annotated[str | None, typer.Option(help="DNS label; derived if omitted")] = None,
    residency: Annotated[
        str | None,
        typer.Option(
            help="Data-residency rule: eu, us or apac. The database, its backups and its "
            "restores never leave that jurisdiction."
        ),
    ] = None,
    wait: WaitOpt = True,
    wait_for_region: Annotated[
        bool,
        typer.Option(
            help="If the region's server failed its last health check, queue the create "
            "until it is back instead of failing at once"
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="How long to wait for the database, in seconds")
    ] = 120,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a project and its database, showing the provisioning's progress;
    prints the connection string. Exits non-zero, with the operation to
    follow, if the database is not ready within --timeout."""
    body = {
        "name": name,
        "region": region,
        "plan": plan,
        "subdomain": subdomain,
        "residency": residency,
    }
    client = Client(url, token)
    region_wait = {"wait_for_region": str(wait_for_region).lower()}
    if as_json:
        return print_json(
            client.call(
                "POST",
                "/v1/projects",
                json=body,
                params={"wait": str(wait).lower(), **region_wait},
            )
        )
    started = client.call(
        "POST", "/v1/projects", json=body, params={"wait": "false", **region_wait}
    )
    if started["connection"] is not None:  # finished within the request already (201)
        data = started
    else:
        op_id = started["operation"]["id"]
        if not wait:
            out.print(_project_table(started))
            _print_started(started["operation"])
            return
        op = follow(client, op_id, timeout=timeout)
        if op["status"] in DONE_STATES and op["status"] != "finished":
            # An undone create leaves nothing to show: its error says why.
            fail(f"operation {op_id} {op['status']}: {op['error'] or 'no error given'}")
        if op["status"] != "finished":
            out.print(_project_table(client.call("GET", f"/v1/projects/{op['project_id']}")))
            fail(
                f"the database is not ready after {timeout:g} s: operation {op_id} is "
                f"{op['status']} at step {op['current_step'] or '-'}"
                + (f" (last error: {_last_error(op)})" if _last_error(op) else "")
                + f"; follow it with `pgfleet ops watch {op_id}`, or cancel it with "
                f"`pgfleet ops cancel {op_id}`",
                code=2,
            )
        data = client.call("GET", f"/v1/projects/{op['project_id']}")
        data["connection"] = client.call("GET", f"/v1/projects/{op['project_id']}/connection")
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
        return print_json(data)
    t, short = list_table(
        "Projects", ("id", "name", "region", "hosted in", "plan", "status", "created")
    )
    for p in data["projects"]:
        hosted = p["hosted_region"] or "-"
        add_row(
            t,
            shown_id(p["id"], short),
            p["name"],
            p["region"] if short else f"{p['region_flag'] or ''} {p['region']}",
            hosted,
            p["plan_type"] or "-",
            p["status"],
            when(p["created_at"]),
        )
    out.print(t)


@projects_app.command("show")
def projects_show(
    project_id: ProjectArg, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """One project: requested and hosting region, server, plan and its
    limits, status, database size and open connections."""
    client = Client(url, token)
    data = client.call("GET", f"/v1/projects/{project_id}")
    if as_json:
        return print_json(data)
    t = _project_table(data)
    if data["status"] in ("active", "paused"):
        usage = client.call("GET", f"/v1/projects/{data['id']}/usage")
        if usage["reachable"]:
            add_row(t, "database size", size(usage["database_bytes"]))
            add_row(t, "connections", f"{usage['connections']} open")
        else:
            add_row(t, "usage", "the server does not answer now")
    for k, v in _limits(client, data["plan_type"]):
        add_row(t, k, v)
    out.print(t)


def _limits(client: Client, plan_id: str | None) -> list[tuple[str, str]]:
    """A plan's limits, as `projects show` and a plan change print them."""
    plans = {p["id"]: p for p in client.call("GET", "/v1/plans")["plans"]}
    p = plans.get(plan_id or "free")
    if p is None:
        return []
    return [
        ("connection limit", str(p["connection_limit"])),
        ("statement timeout", f"{p['statement_timeout_ms'] / 1000:g} s"),
        ("rows per statement", f"{p['max_result_rows']:,}"),
        ("point-in-time restore", f"{p['pitr_days']} days"),
    ]


@projects_app.command("delete")
def projects_delete(
    project_id: ProjectArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    wait: WaitOpt = True,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete a project: drops its database and roles. Asks first, naming
    the project (--yes for scripts; without a terminal, --yes is needed)."""
    client = Client(url, token)
    project = client.call("GET", f"/v1/projects/{project_id}")
    confirm(
        f"Drop the database of project {project['name']!r} ({project['id']})?",
        yes,
        why="only its backups can bring it back (`pgfleet backups restore`)",
    )
    data = client.call(
        "DELETE", f"/v1/projects/{project['id']}", params={"wait": str(wait).lower()}
    )
    _print_started(data["operation"], data["project"])


def _last_error(op: dict[str, Any]) -> str | None:
    """The error of the step that is retrying, if any (a region that does not answer)."""
    return next((st["error"] for st in reversed(op["steps"]) if st.get("error")), None)


def _print_started(op: dict[str, Any], project: dict[str, Any] | None = None) -> None:
    if project is not None:
        out.print(f"project {project['id']} is {project['status']}")
    out.print(f"operation {op['id']} ({op['type']}) is {op['status']}")
    if op["status"] in ("scheduled", "running"):
        out.print(f"follow it with: pgfleet ops watch {op['id']}")
    elif op["status"] == "failed":
        fail(f"operation {op['id']} failed: {op['error']}")


def _lifecycle(
    path: str,
    url: str | None,
    token: str | None,
    wait: bool,
    as_json: bool,
    body: Any = None,
    flags: dict[str, str] | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = Client(url, token).call(
        "POST", path, json=body, params={"wait": str(wait).lower()}, flags=flags
    )
    if as_json:
        print_json(data)
    else:
        _print_started(data["operation"], data["project"])
    return data


@projects_app.command("rotate-password")
def projects_rotate(
    project_id: ProjectArg,
    role: Annotated[str, typer.Option(help="all, rw or ro")] = "all",
    overlap: Annotated[
        int,
        typer.Option(
            help="Seconds the old credentials keep working (the new ones then use the "
            "project's other login role)"
        ),
    ] = 0,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    wait: WaitOpt = True,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """New passwords for the project's login roles; the old ones stop working
    at once (asks first; --yes for scripts), or after --overlap seconds."""
    if overlap == 0:
        confirm(
            f"Rotate the passwords of project {project_id}? Clients using the old ones are "
            "disconnected now (--overlap keeps them working for a while)",
            yes,
        )
    data = _lifecycle(
        f"/v1/projects/{project_id}/rotate-password",
        url,
        token,
        wait,
        as_json,
        {"role": role, "overlap_s": overlap},
        {"overlap_s": "--overlap", "role": "--role"},
    )
    if as_json or data["operation"]["status"] != "finished":
        return
    # The strings with a new password: the read-write one when it changed,
    # the read-only one when it did (found: --role ro printed the unchanged
    # read-write string).
    if role in ("all", "rw") and data.get("connection"):
        out.print(
            Text.assemble(("connection: ", "bold"), data["connection"]["uri"]),
            soft_wrap=True,
            highlight=False,
        )
    if role in ("all", "ro"):
        ro = Client(url, token).call(
            "GET", f"/v1/projects/{data['project']['id']}/connection", params={"mode": "ro"}
        )
        out.print(
            Text.assemble(("read-only connection: ", "bold"), ro["uri"]),
            soft_wrap=True,
            highlight=False,
        )


@projects_app.command("pause")
def projects_pause(
    project_id: ProjectArg,
    wait: WaitOpt = True,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Refuse new connections and end open ones; data is kept."""
    _lifecycle(f"/v1/projects/{project_id}/pause", url, token, wait, as_json)


@projects_app.command("resume")
def projects_resume(
    project_id: ProjectArg,
    wait: WaitOpt = True,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Accept connections again."""
    _lifecycle(f"/v1/projects/{project_id}/resume", url, token, wait, as_json)


@projects_app.command("plan")
def projects_plan(
    project_id: ProjectArg,
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
    if not as_json and data["operation"]["status"] == "finished":
        t = Table(title=f"limits of the {data['project']['plan_type']} plan", show_header=False)
        t.add_column(style="bold")
        t.add_column()
        for k, v in _limits(Client(url, token), data["project"]["plan_type"]):
            add_row(t, k, v)
        out.print(t)


@projects_app.command("audit")
def projects_audit(
    project_id: ProjectArg,
    limit: Annotated[int, typer.Option(help="How many entries")] = 50,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Who did what to the project, newest first."""
    data = Client(url, token).call(
        "GET", f"/v1/projects/{project_id}/audit", params={"limit": limit}
    )
    print_audit(data, as_json)


@projects_app.command("connection")
def projects_connection(
    project_id: ProjectArg,
    mode: Annotated[str, typer.Option(help="rw or ro")] = "rw",
    pooling: Annotated[
        str,
        typer.Option(
            help="The router's pooling: session (everything works) or transaction "
            "(for serverless clients; session state ends with each transaction)"
        ),
    ] = "session",
    direct: Annotated[
        bool,
        typer.Option(
            "--direct",
            help="The server's own address (for pg_dump, replication); it changes if "
            "the project moves, the router's does not",
        ),
    ] = False,
    via: Annotated[str | None, typer.Option(help="Connect through another region's router")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the project's connection string: through its region's router
    (pooled, session mode) unless asked otherwise. A note on stderr says what
    to know about it (transaction pooling's limits, a direct address)."""
    params: dict[str, str] = {"mode": mode, "pooling": pooling}
    if direct:
        params["direct"] = "true"
    if via:
        params["via"] = via
    data = Client(url, token).call("GET", f"/v1/projects/{project_id}/connection", params=params)
    if as_json:
        return print_json(data)
    sys.stdout.write(data["uri"] + "\n")
    if data.get("note"):
        sys.stderr.write(f"note: {data['note']}\n")
