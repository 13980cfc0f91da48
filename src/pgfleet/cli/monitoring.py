"""SQL, statistics, the advisor and costs."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import typer
from rich.table import Table
from rich.text import Text

from pgfleet.cli.common import (
    NEXT_STEP,
    UUID_RE,
    Client,
    JsonOpt,
    ProjectArg,
    TokenOpt,
    UrlOpt,
    add_row,
    app,
    fail,
    out,
    print_json,
    projects_app,
    stats_app,
)
from pgfleet.display import display, duration, printable, size, when

# ---- SQL, stats, advisor, costs --------------------------------------------


@app.command("sql")
def sql_cmd(
    project_id: ProjectArg,
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
    if not UUID_RE.fullmatch(project_id):
        project_id = client.project_id(project_id)
    with httpx.Client(base_url=client.url, timeout=600, headers=client.headers) as http:
        try:
            r = http.post(f"/v1/projects/{project_id}/sql", json=body)
        except httpx.TransportError:
            fail(f"cannot reach the pgfleet API at {client.url}; is it running (`pgfleet up`)?")
    data = r.json() if r.content else {}
    if r.status_code >= 400:
        if as_json:
            print_json(data)
            raise typer.Exit(1)
        e = data.get("error", {}) if isinstance(data, dict) else {}
        msg = e.get("message") or r.text[:500]
        extra = []
        if e.get("sqlstate"):
            extra.append(f"SQLSTATE {e['sqlstate']}")
        if e.get("position"):
            extra.append(f"at character {e['position']}")
        # As psql: the server's detail and hint on lines of their own.
        said = "".join(f"\n{k}: {e[k]}" for k in ("detail", "hint") if e.get(k))
        step = NEXT_STEP.get(e.get("code") or "")
        fail(
            msg
            + (f" ({', '.join(extra)})" if extra else f" (HTTP {r.status_code})")
            + said
            + (f"\n{step}" if step else "")
        )
    if as_json:
        return print_json(data)
    if data["columns"]:
        t = Table(show_lines=False)
        for c in data["columns"]:
            t.add_column(Text(f"{c['name']}\n{c['type']}"))
        for row in data["rows"]:
            add_row(t, *[display(v, c["type"]) for v, c in zip(row, data["columns"], strict=True)])
        out.print(t)
    more = " (truncated)" if data["truncated"] else ""
    took = duration(data["duration_ms"])
    out.print(Text(f"{data['command']}: {data['row_count']} row(s){more} in {took}"))


@stats_app.command("regions")
def stats_regions(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Tenants per region: free/paid, status, share, hosted elsewhere, servers."""
    data = Client(url, token).call("GET", "/v1/admin/stats/regions")
    if as_json:
        return print_json(data)
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
        add_row(
            t,
            f"{r['flag']} {r['region']}",
            r["status"],
            r["tenants"],
            f"{r['free']}/{r['paid']}",
            f"{r['active']}/{r['paused']}/{r['failed']}",
            f"{r['share']:.0%}",
            r["hosted"],
            len(r["servers"]),
            size(r["bytes"]),
        )
    out.print(t)
    out.print(f"{data['requested_not_hosted']} project(s) picked a region that does not host them")


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
        return print_json(data)
    exact = "" if data["exact"] else " (percentiles from histograms)"
    t = Table(title=f"Query performance, last {window}{exact}")
    for col in (by, "route", "queries", "errors", "avg ms", "p50 ms", "p95 ms", "p99 ms"):
        t.add_column(col)
    for r in data["rows"]:
        add_row(
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
    servers = data.get("server_statements") or []
    if servers:
        t = Table(title="All clients, from the servers' pg_stat_statements (cumulative)")
        for col in ("hosted region", "projects", "calls", "total", "mean", "since"):
            t.add_column(col)
        for r in servers:
            add_row(
                t,
                r["region"],
                r["projects"],
                r["calls"],
                duration(r["total_ms"]),
                duration(r["mean_ms"]),
                when(r["since"]),
            )
        out.print(t)


@projects_app.command("stats")
def project_stats(
    project_id: ProjectArg,
    window: Annotated[str, typer.Option(help="SQL API figures: e.g. 30m, 24h, 7d")] = "24h",
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A project's query insights: every client's statements (from its
    server's pg_stat_statements: calls, total and mean time, rows, cache
    hits), then the SQL API's own figures over --window."""
    data = Client(url, token).call(
        "GET", f"/v1/projects/{project_id}/stats", params={"window": window}
    )
    if as_json:
        return print_json(data)
    server = data["server_statements"]
    title = f"All clients (pg_stat_statements), since {when(server['since'])}"
    t = Table(title=title)
    for col in ("statement", "calls", "total", "mean", "rows", "cache hits"):
        t.add_column(col)
    for s in server["statements"]:
        ratio = s["cache_hit_ratio"]
        add_row(
            t,
            " ".join(s["query"].split())[:120],
            s["calls"],
            duration(s["total_ms"]),
            duration(s["mean_ms"]),
            s["rows"],
            "-" if ratio is None else f"{ratio:.1%}",
        )
    if server["statements"]:
        out.print(t)
    else:
        said = printable(server["note"] or "no statements yet")
        out.print(Text(f"All clients (pg_stat_statements): {said}"))
    out.print(
        f"sampled {when(server['sampled_at'])}; utility statements (DDL, ALTER ROLE) are "
        "not tracked",
        highlight=False,
    )
    t = Table(title=f"Through the SQL API, last {window}")
    for col in ("route", "queries", "errors", "avg ms", "p50 ms", "p95 ms", "p99 ms"):
        t.add_column(col)
    for r in data["routes"]:
        add_row(
            t,
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
        return print_json(data)
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
        add_row(t, r["kind"].replace("_", " "), r["region"], r["reason"])
    out.print(t)


@app.command()
def costs(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Monthly cost per region and the seed's expansion options (admin)."""
    data = Client(url, token).call("GET", "/v1/admin/costs")
    if as_json:
        return print_json(data)
    cur = data["currency"]
    t = Table(title=f"Monthly cost per region ({cur})")
    for col in ("region", "servers", "projects", "monthly", "per project"):
        t.add_column(col)
    for r in data["regions"]:
        add_row(
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
        add_row(o, r["name"], f"{r['monthly']:.2f}{high}", r["description"])
    out.print(o)
