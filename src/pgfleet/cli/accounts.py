"""Tokens and owners."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from pgfleet.cli.common import (
    Client,
    JsonOpt,
    TokenOpt,
    UrlOpt,
    add_row,
    fail,
    list_table,
    out,
    owners_app,
    print_json,
    row,
    shown_id,
    tokens_app,
)
from pgfleet.display import when

# ---- tokens and owners -----------------------------------------------------


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Option(help="A label")] = "cli",
    scope: Annotated[
        str,
        typer.Option(
            help="all: everything you may do; read: list, show and read-only SQL (mode ro)"
        ),
    ] = "all",
    expires_in: Annotated[
        str | None,
        typer.Option(help="It stops working after this many days: e.g. 30d (1d-3650d)"),
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token for yourself; it is shown once."""
    body: dict[str, object] = {"name": name, "scope": scope}
    if expires_in is not None:
        days = expires_in.strip().lower().removesuffix("d")
        if not (days.isascii() and days.isdecimal()):
            fail(f"--expires-in takes days, as 30d or 30, not {expires_in!r}")
        body["expires_in_days"] = int(days)
    data = Client(url, token).call("POST", "/v1/tokens", json=body)
    if as_json:
        return print_json(data)
    out.print(
        f"token {data['id']} ({escape(data['name'])}, scope {data['scope']}, "
        f"expires {when(data['expires_at']) if data['expires_at'] else 'never'}): "
        f"[bold]{data['token']}[/]",
        soft_wrap=True,
    )
    out.print("Store it now: it is not shown again.")


def _tokens_table(rows: list[dict[str, Any]]) -> Table:
    # On a narrow terminal (see list_table) a token's creation is left out:
    # eight columns do not fit in 80 (`--json` has it).
    t, short = list_table(
        "Tokens",
        ("id", "name", "prefix", "scope", "created", "expires", "last used", "revoked"),
        whole=("id", "prefix", "scope"),
        moments=("created", "expires", "last used", "revoked"),
        leave_out=("created",),
    )
    for r in rows:
        expires = "never" if r["expires_at"] is None else when(r["expires_at"])
        row(
            t,
            {
                "id": shown_id(r["id"], short),
                "name": r["name"],
                "prefix": f"{r['token_prefix']}" + ("…" if short else "..."),
                "scope": r["scope"],
                "created": when(r["created_at"]),
                "expires": expires + (" (expired)" if r["expired"] else ""),
                "last used": when(r["last_used_at"]),
                "revoked": when(r["revoked_at"]),
            },
        )
    return t


@tokens_app.command("list")
def tokens_list(
    owner: Annotated[
        str | None, typer.Option(help="Another owner's id (admin): their tokens")
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Your tokens (prefix only), or another owner's (admin, --owner)."""
    path = "/v1/tokens" if owner is None else f"/v1/admin/owners/{owner}/tokens"
    data = Client(url, token).call("GET", path)
    if as_json:
        return print_json(data)
    out.print(_tokens_table(data["tokens"]))


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[
        str, typer.Argument(help="Token id, a unique id prefix or the token's name")
    ],
    any_owner: Annotated[
        bool, typer.Option("--any-owner", help="Admin: revoke another owner's token")
    ] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Revoke one of your tokens, by its id, a unique id prefix or its name
    (an admin, with --any-owner, anyone's, by its whole id)."""
    client = Client(url, token)
    if not any_owner:
        token_id = client.resolve(token_id, "/v1/tokens", "tokens", "token")
    path = f"/v1/admin/tokens/{token_id}" if any_owner else f"/v1/tokens/{token_id}"
    client.call("DELETE", path)
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
        return print_json(data)
    out.print(f"owner {data['owner']['id']} ({escape(data['owner']['name'])})")
    out.print(f"token: [bold]{data['token']}[/]  (shown once)", soft_wrap=True)


@owners_app.command("list")
def owners_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """All owners with their project counts (admin)."""
    data = Client(url, token).call("GET", "/v1/admin/owners")
    if as_json:
        return print_json(data)
    t = Table(title="Owners")
    for col in ("id", "name", "admin", "projects", "created"):
        t.add_column(col)
    for r in data["owners"]:
        add_row(
            t,
            r["id"],
            r["name"],
            "yes" if r["is_admin"] else "",
            str(r["projects"]),
            when(r["created_at"]),
        )
    out.print(t)
