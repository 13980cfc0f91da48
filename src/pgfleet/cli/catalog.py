"""The catalog: regions and plans."""

from __future__ import annotations

from rich.table import Table

from pgfleet.cli.common import (
    Client,
    JsonOpt,
    TokenOpt,
    UrlOpt,
    add_row,
    app,
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
        return print_json({"regions": data})  # every list in --json has its envelope
    t = Table(title="Regions")
    for col in ("id", "name", "flag", "status", "servers"):
        t.add_column(col)
    for r in data:
        status_txt = r["status"] + (" (default)" if r["default"] else "")
        add_row(t, r["id"], r["name"], r["flag"], status_txt, str(r["server_count"]))
    out.print(t)


@app.command("plans")
def plans(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """The plans: limits, backups' retention and price."""
    data = Client(url, token).call("GET", "/v1/plans")
    if as_json:
        return print_json(data)
    t = Table(title="Plans")
    for col in (
        "plan",
        "price / month",
        "connections",
        "per router",
        "statement timeout",
        "rows per statement",
        "point in time",
        "snapshots",
    ):
        t.add_column(col)
    for p in data["plans"]:
        price = p["monthly_price_usd"]
        shown = "on request" if price is None else ("free" if price == 0 else f"{price:.2f} USD")
        snaps = (
            f"every {p['snapshot_every_h']} h" if p["snapshot_every_h"] else "on request"
        ) + f", newest {p['snapshot_keep']} kept"
        add_row(
            t,
            p["id"],
            shown,
            str(p["connection_limit"]),
            f"{p['router_clients']:,} clients, {p['router_pool_size']} to the server",
            f"{p['statement_timeout_ms'] / 1000:g} s",
            f"{p['max_result_rows']:,}",
            f"{p['pitr_days']} days",
            snaps,
        )
    out.print(t)
