"""The region catalog."""

from __future__ import annotations

from rich.table import Table

from pgfleet.cli.common import (
    Client,
    JsonOpt,
    TokenOpt,
    UrlOpt,
    add_row,
    out,
    print_json,
    regions_app,
)

# ---- regions ---------------------------------------------------------------


@regions_app.command("list")
def regions_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """The six regions: id, name, flag, status and server count."""
    data = Client(url, token).call("GET", "/v1/regions")
    if as_json:
        return print_json(data)
    t = Table(title="Regions")
    for col in ("id", "name", "flag", "status", "servers"):
        t.add_column(col)
    for r in data:
        status_txt = r["status"] + (" (default)" if r["default"] else "")
        add_row(t, r["id"], r["name"], r["flag"], status_txt, str(r["server_count"]))
    out.print(t)
