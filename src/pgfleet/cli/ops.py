"""Operations, the audit log and the reconciler."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pgfleet.cli.common import (
    Client,
    JsonOpt,
    TokenOpt,
    UrlOpt,
    add_row,
    app,
    fail,
    list_table,
    ops_app,
    out,
    print_audit,
    print_json,
    row,
    shown_id,
)
from pgfleet.display import duration, printable, when

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
        ("created", when(op["created_at"])),
        ("started", when(op["started_at"])),
        ("finished", when(op["finished_at"])),
        ("duration", duration(op["duration_ms"])),
        ("deadline", when(op["deadline"]) + (" (missed)" if op["deadline_missed"] else "")),
    ]
    if op["cancel_requested"]:
        rows.append(("cancel", "requested"))
    if op["error"]:
        rows.append(("error", Text(op["error"], "red")))
    for k, v in rows:
        add_row(t, k, v)
    return t


def _op_status(op: dict[str, Any]) -> Text:
    colour = {"finished": "green", "failed": "red", "cancelled": "yellow"}.get(op["status"], "cyan")
    return Text(op["status"], colour)


def _steps_table(op: dict[str, Any]) -> Table:
    t = Table(title="Steps")
    for col in ("#", "step", "status", "attempts", "duration", "error"):
        t.add_column(col)
    for st in op["steps"]:
        add_row(
            t,
            st["position"] + 1,
            st["name"],
            st["status"],
            st["attempts"],
            duration(st["duration_ms"]),
            st["error"] or "",
        )
    return t


def _operation(client: Client, ref: str) -> str:
    """An operation's id from its whole id or a unique prefix of it (among
    your newest 500)."""
    return client.resolve(ref, "/v1/operations", "operations", "operation", {"limit": 500})


OperationArg = Annotated[
    str, typer.Argument(help="Operation id, or a unique prefix of it (among your newest 500)")
]


@ops_app.command("show")
def ops_show(
    operation_id: OperationArg, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """One operation: status, steps with their durations, attempts, error."""
    client = Client(url, token)
    data = client.call("GET", f"/v1/operations/{_operation(client, operation_id)}")
    if as_json:
        return print_json(data)
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
    data = Client(url, token).call(
        "GET", path, params=params, flags={"status": "--status", "limit": "--limit"}
    )
    if as_json:
        return print_json(data)
    # On a narrow terminal (see list_table) the step goes with the status
    # and the errors follow the table, each under its short id.
    t, short = list_table(
        "Operations",
        ("id", "type", "status", "project", "step", "created", "duration", "error"),
        whole=("id", "type", "project", "duration"),
        moments=("created",),
        leave_out=("step", "error"),
    )
    errors: list[tuple[str, str]] = []
    for op in data["operations"]:
        shown = _op_status(op)
        if short and op["current_step"]:
            shown.append(f": {op['current_step']}")
        if short and op["error"]:
            errors.append((shown_id(op["id"], short), op["error"]))
        row(
            t,
            {
                "id": shown_id(op["id"], short),
                "type": op["type"],
                "status": shown,
                "project": shown_id(op["project_id"], short),
                "step": op["current_step"] or "-",
                "created": when(op["created_at"]),
                "duration": duration(op["duration_ms"]),
                "error": (op["error"] or "")[:60],
            },
        )
    out.print(t)
    for op_id, error in errors:
        out.print(f"{op_id}: {printable(error)}", highlight=False, markup=False)


@ops_app.command("watch")
def ops_watch(
    operation_id: OperationArg,
    interval: Annotated[float, typer.Option(help="Seconds between polls")] = 0.3,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds")] = 600,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Follow one operation live, step by step, until it ends."""

    client = Client(url, token)
    op = follow(client, _operation(client, operation_id), timeout=timeout, interval=interval)
    out.print(_op_table(op))
    if op["steps"]:
        out.print(_steps_table(op))
    if op["status"] == "failed":
        raise typer.Exit(1)
    if op["status"] not in DONE_STATES:
        fail(f"operation {operation_id} is still {op['status']} after {timeout:g} s")


DONE_STATES = ("finished", "failed", "cancelled")


def follow(client: Client, operation_id: str, *, timeout: float, interval: float = 0.3) -> Any:
    """The operation, followed live (a progress line of its steps) until it
    ends or `timeout` seconds pass; returns its last state."""
    op = client.call("GET", f"/v1/operations/{operation_id}")
    done_states = DONE_STATES
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
            finished = sum(1 for st in op["steps"] if st["status"] in ("finished", "skipped"))
            planned = len(op.get("planned_steps") or ())
            total = max(planned, len(op["steps"]), finished) or None
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
    return op


@ops_app.command("cancel")
def ops_cancel(
    operation_id: OperationArg, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Cancel a scheduled or running operation (undone at its next step)."""
    client = Client(url, token)
    data = client.call("POST", f"/v1/operations/{_operation(client, operation_id)}/cancel")
    if as_json:
        return print_json(data)
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
    print_audit(data, as_json)


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
        "POST",
        "/v1/admin/reconcile",
        json={"repair": repair, "force": force},
        params={"wait": "true"} if repair else None,
    )
    if repair:  # a `reconcile` operation; its result holds the report
        op = data
        if op["status"] not in ("finished", "failed", "cancelled"):
            if as_json:
                return print_json(op)
            fail(
                f"the repair is still running: operation {op['id']} "
                f"(follow it with `pgfleet ops watch {op['id']}`)"
            )
        if op["status"] != "finished":
            if as_json:
                return print_json(op)
            fail(f"the repair {op['status']}: {op.get('error') or 'no error text'}")
        data = (op.get("result") or {}).get("report") or {}
    if as_json:
        return print_json(data)
    findings = data["findings"]
    if not findings:
        out.print(
            f"no differences: {data['servers_checked']} server(s) checked "
            f"in {duration(data['duration_ms'])}"
        )
        return
    t = Table(title=f"Reconciler findings ({'repair' if repair else 'report only'})")
    for col in ("kind", "server", "object", "detail", "repaired", "action"):
        t.add_column(col)
    for f in findings:
        add_row(
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
