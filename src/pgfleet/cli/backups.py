"""Backups: snapshots, the restorable window, restores, base backups."""

from __future__ import annotations

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
    backups_app,
    confirm,
    fail,
    out,
    print_json,
)
from pgfleet.display import size, when


@backups_app.command("create")
def backups_create(
    project_id: ProjectArg,
    wait: WaitOpt = True,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Snapshot a project now: pg_dump as its own role into its backup region."""
    data = Client(url, token).call(
        "POST", f"/v1/projects/{project_id}/backups", params={"wait": str(wait).lower()}
    )
    if as_json:
        return print_json(data)
    b, op = data["backup"], data["operation"]
    if b["status"] == "ok":
        out.print(
            f"backup {b['id']}: {size(b['size_bytes'])}, {b['tables']} tables, {b['rows']} rows, "
            f"stored in {b['storage_region']} (sha256 {b['sha256'][:16]}...)"
        )
    else:
        out.print(f"backup {b['id']} is {b['status']}; operation {op['id']} is {op['status']}")
        if op["status"] in ("scheduled", "running"):
            out.print(f"follow it with: pgfleet ops watch {op['id']}")


@backups_app.command("list")
def backups_list(
    project_id: ProjectArg, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """A project's snapshots and the window a point-in-time restore reaches."""
    data = Client(url, token).call("GET", f"/v1/projects/{project_id}/backups")
    if as_json:
        return print_json(data)
    w = data["restorable_window"]
    if w:
        out.print(
            Text.assemble(
                ("restorable: ", "bold"),
                f"{when(w['earliest'], round_up=True)} .. {when(w['latest'])} "
                f"({data['window_note']})",
            ),
            soft_wrap=True,
        )
    else:
        out.print(Text.assemble(("restorable: ", "bold"), f"none ({data['window_note']})"))
    out.print(Text.assemble(("stored in: ", "bold"), data["storage_region"]))
    t = Table(title="Snapshots")
    for col in ("id", "taken", "status", "size", "tables", "rows", "reason"):
        t.add_column(col)
    for b in data["backups"]:
        add_row(
            t,
            b["id"],
            when(b["created_at"]),
            b["status"] + (f": {b['error']}" if b.get("error") else ""),
            size(b["size_bytes"]),
            str(b["tables"] if b["tables"] is not None else "-"),
            str(b["rows"] if b["rows"] is not None else "-"),
            b["reason"],
        )
    out.print(t)


@backups_app.command("restore")
def backups_restore(
    project_id: ProjectArg,
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            help="The moment to restore to (ISO 8601; without a zone, UTC); default: the latest",
        ),
    ] = None,
    backup: Annotated[
        str | None, typer.Option(help="A snapshot id to restore instead of a moment")
    ] = None,
    region: Annotated[
        str | None, typer.Option(help="Region of the new project; default: the original's")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name of the new project")] = None,
    into: Annotated[
        str,
        typer.Option(
            help="new: a new project beside the original; same: over the project itself, "
            "after a safety snapshot (asks first; --yes for scripts)"
        ),
    ] = "new",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    wait: WaitOpt = True,
    wait_for_region: Annotated[
        bool,
        typer.Option(
            help="If the new project's server failed its last health check, queue the "
            "restore until it is back instead of failing at once (--into new)"
        ),
    ] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore a project (also a deleted one) into a new project, whose
    connection string it prints; the original is never written to. With
    --into same, over the project itself after a safety snapshot."""
    if into == "same":
        confirm(
            f"Replace the data of project {project_id} (a safety snapshot is taken first)?", yes
        )
    body: dict[str, Any] = {"into": into}
    for key, value in (("target_time", at), ("backup_id", backup), ("region", region)):
        if value is not None:
            body[key] = value
    if name is not None:
        body["name"] = name
    data = Client(url, token).call(
        "POST",
        f"/v1/projects/{project_id}/restore",
        json=body,
        params={"wait": str(wait).lower(), "wait_for_region": str(wait_for_region).lower()},
        flags={
            "target_time": "--at",
            "backup_id": "--backup",
            "region": "--region",
            "name": "--name",
            "wait_for_region": "--wait-for-region",
        },
    )
    if as_json:
        return print_json(data)
    # `into: same` answers with the project and the operation; `new` with the
    # new project's own fields (and its connection once ready).
    project = data["project"] if into == "same" else data
    if into == "same" and data["operation"]["status"] == "finished":
        result = data["operation"].get("result") or {}
        out.print(
            f"restored project {project_id} over itself: {result.get('verified_tables', '?')} "
            f"tables, {result.get('verified_rows', '?')} rows checked; what it had is kept as "
            f"snapshot {result.get('safety_snapshot', '?')}"
        )
        return
    if into == "same" or data.get("connection") is None:  # 202: still running
        op = data["operation"]
        out.print(f"project {project['id']} is {project['status']}")
        out.print(f"operation {op['id']} (restore) is {op['status']}")
        if op["status"] in ("scheduled", "running"):
            out.print(f"follow it with: pgfleet ops watch {op['id']}")
        elif op["status"] == "failed":
            fail(f"the restore failed: {op['error']}")
        return
    result = (data.get("operation") or {}).get("result") or {}
    out.print(
        f"restored into project {data['id']} ({data['name']}) in {data['hosted_region']}: "
        f"{result.get('verified_tables', '?')} tables, {result.get('verified_rows', '?')} rows "
        "checked against the source"
    )
    out.print(
        Text.assemble(("connection: ", "bold"), data["connection"]["uri"]),
        soft_wrap=True,
        highlight=False,
    )


@backups_app.command("servers")
def backups_servers(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """(admin) Each server's base backups and WAL archiving."""
    data = Client(url, token).call("GET", "/v1/admin/base-backups")
    if as_json:
        return print_json(data)
    t = Table(title="Base backups")
    for col in ("server", "stored in", "archiving", "last archived", "backups", "newest"):
        t.add_column(col)
    for s in data["servers"]:
        a = s["archiving"]
        state = "unknown" if a is None else ("FAILING" if a["failing"] else a["archive_mode"])
        newest = s["backups"][-1] if s["backups"] else None
        add_row(
            t,
            s["server"],
            s["storage_region"],
            state,
            (a or {}).get("last_archived_at") or "-",
            str(len(s["backups"])),
            f"{newest['label']} ({newest['type']})" if newest else "none yet",
        )
    out.print(t)


@backups_app.command("base")
def backups_base(
    server: str,
    type_: Annotated[str, typer.Option("--type", help="full, diff or incr")] = "full",
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """(admin) Take a base backup of a server now."""
    data = Client(url, token).call(
        "POST", "/v1/admin/base-backups", json={"server": server, "type": type_}
    )
    if as_json:
        return print_json(data)
    out.print(
        f"{data['type']} backup {data['label']} of {server}: {size(data['repo_bytes'])} in the "
        f"repository ({size(data['size_bytes'])} of data)"
    )
