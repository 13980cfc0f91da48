"""Tokens and owners."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from pgfleet.cli.common import (
    Client,
    JsonOpt,
    TokenOpt,
    UrlOpt,
    add_row,
    out,
    owners_app,
    print_json,
    tokens_app,
)
from pgfleet.display import when

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
        add_row(
            t,
            r["id"],
            r["name"],
            r["token_prefix"] + "...",
            when(r["created_at"]),
            when(r["last_used_at"]),
            when(r["revoked_at"]),
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
        return print_json(data)
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
        add_row(
            t,
            r["id"],
            r["name"],
            "yes" if r["is_admin"] else "",
            str(r["projects"]),
            when(r["created_at"]),
        )
    out.print(t)
