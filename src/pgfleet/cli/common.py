"""What every command shares: the Typer apps, the consoles, the options,
the REST client, and the files in the data directory."""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pgfleet.config import Settings, get_settings
from pgfleet.display import printable, printable_json, when

app = typer.Typer(
    rich_markup_mode="markdown",
    help="pgfleet: multi-region PostgreSQL databases for your projects.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from pgfleet import __version__

        print(f"pgfleet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """pgfleet: multi-region PostgreSQL databases for your projects."""


regions_app = typer.Typer(
    rich_markup_mode="markdown", help="The region catalog.", no_args_is_help=True
)
projects_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Create, list, show and delete projects.",
    no_args_is_help=True,
)
tokens_app = typer.Typer(rich_markup_mode="markdown", help="Your API tokens.", no_args_is_help=True)
owners_app = typer.Typer(
    rich_markup_mode="markdown", help="Owners (admin only).", no_args_is_help=True
)
app.add_typer(regions_app, name="regions")
app.add_typer(projects_app, name="projects")
app.add_typer(tokens_app, name="tokens")
app.add_typer(owners_app, name="owners")
ops_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Operations: what pgfleet is doing or did to your projects.",
    no_args_is_help=True,
)
app.add_typer(ops_app, name="ops")
stats_app = typer.Typer(
    rich_markup_mode="markdown", help="Fleet statistics (admin).", no_args_is_help=True
)
app.add_typer(stats_app, name="stats")
backups_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Snapshots, point-in-time restores and the servers' base backups.",
    no_args_is_help=True,
)
app.add_typer(backups_app, name="backups")

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_PROJECT_PATH = re.compile(r"^/v1/projects/([^/?]+)(.*)$", re.S)


def _plain(cell: object) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


class _Out(Console):
    """stdout. A table on a terminal never cuts an id (ids are what every
    command takes); anywhere else (a pipe, a file, `grep`) it is printed as
    tab-separated lines without colours or box drawing, a header first, and
    a message is never folded at an assumed width: a line a script reads is
    the line the command printed."""

    def print(self, *objects: Any, **kw: Any) -> None:
        if not self.is_terminal:
            kw.setdefault("soft_wrap", True)
        if len(objects) == 1 and isinstance(objects[0], Table):
            table = objects[0]
            cols = table.columns
            if not self.is_terminal:
                rows = []
                if table.show_header:
                    rows.append([_plain(c.header).replace("\n", " ") for c in cols])
                for i in range(table.row_count):
                    # One line per row: a value's own tabs and newlines escaped.
                    rows.append(
                        [
                            _plain(c._cells[i]).replace("\t", "\\t").replace("\n", "\\n")
                            for c in cols
                        ]
                    )
                self.file.write("".join("\t".join(row) + "\n" for row in rows))
                self.file.flush()
                return
            for c in cols:
                if any(UUID_RE.search(_plain(cell)) for cell in c._cells):
                    c.no_wrap = True
                    c.min_width = max(c.min_width or 0, 36)
        super().print(*objects, **kw)


out = _Out()
err = Console(stderr=True)

# Under this many columns, a list's ids are cut to SHORT_ID characters.
WIDE = 120
SHORT_ID = 8


def narrow() -> bool:
    """Whether stdout is a terminal too narrow for a list's whole ids."""
    return out.is_terminal and out.width < WIDE


def list_table(
    title: str,
    columns: Sequence[str],
    *,
    whole: Sequence[str] = (),
    moments: Sequence[str] = (),
    leave_out: Sequence[str] = (),
) -> tuple[Table, bool]:
    """A list's table, and whether it is a short one. On a terminal too
    narrow for whole ids (36 characters) and the rest, ids show their first
    SHORT_ID characters, which every command takes as a prefix, with
    lighter lines and values folded rather than cut: else every other
    column was cut to a few letters (`eu-…`, found by a newcomer at 80
    columns); the columns in `whole` (short values: a kind, a status) are
    never folded there, those in `moments` fold between the date and the
    time, and those in `leave_out` are not shown (fill rows with row()).
    A pipe always gets whole ids (see _Out)."""
    short = narrow()
    t = (
        Table(
            title=title,
            caption=f"ids cut to {SHORT_ID} characters, which every command takes; "
            "--json has them whole",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
        )
        if short
        else Table(title=title)
    )
    for col in columns:
        if short and col in leave_out:
            continue
        t.add_column(
            col,
            overflow="fold" if short else "ellipsis",
            no_wrap=col in whole,
            min_width=len("2026-12-01") if short and col in moments else None,
        )
    return t, short


def row(table: Table, cells: dict[str, object]) -> None:
    """A row of a list_table, from every column's cell by its name: those
    the table left out are dropped."""
    add_row(table, *(cells[str(c.header)] for c in table.columns))


def shown_id(value: str | None, short: bool) -> str:
    """An id as a list shows it (see list_table); '-' for none."""
    if value is None:
        return "-"
    return value[:SHORT_ID] if short else value


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
ProjectArg = Annotated[
    str, typer.Argument(help="Project id, a unique id prefix or the project's name")
]
WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait/--no-wait",
        help="Wait for the operation to end, or return at once with its id "
        "(follow it with `pgfleet ops watch ID`).",
    ),
]


def say_error(message: str) -> None:
    """`error: message` on stderr. The message can quote a tenant (a RAISE's
    text): no control characters."""
    err.print(
        Text.assemble(("error:", "bold red"), " ", printable(message, lines=True)),
        highlight=False,
    )


def fail(message: str, code: int = 1) -> NoReturn:
    say_error(message)
    raise typer.Exit(code)


def undecodable(args: list[str]) -> str | None:
    """Why one of the command line's arguments cannot be taken, if one
    cannot: bytes that are not UTF-8 (Python keeps them as lone surrogates,
    which no request can carry)."""
    for i, arg in enumerate(args, 1):
        raw = [ord(c) - 0xDC00 for c in arg if 0xDC80 <= ord(c) <= 0xDCFF]
        if raw:
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            if len(shown) > 60:
                shown = shown[:57] + "..."
            return (
                f"argument {i} ({shown}) is not UTF-8 text (byte 0x{raw[0]:02x}); "
                "pgfleet takes names, statements and values as UTF-8"
            )
    return None


def confirm(question: str, yes: bool, *, why: str = "this cannot be undone") -> None:
    """Ask before something that cannot be undone: `--yes` answers for
    scripts; with nobody to ask (no terminal) and no `--yes`, refuse,
    saying `why` it asks."""
    if yes:
        return
    if not sys.stdin.isatty():
        fail(f"{question.rstrip('?')}: {why}; add --yes to confirm")
    typer.confirm(question, abort=True)


def load_settings() -> Settings:
    try:
        return get_settings()
    except Exception as e:  # pydantic ValidationError: show it plainly
        fail(f"invalid settings: {e}")


# ---- files in the data directory -------------------------------------------


def api_file(s: Settings) -> Path:
    return s.home_abs / "api.json"


def token_file(s: Settings) -> Path:
    return s.home_abs / "admin-token"


def pid_file(s: Settings) -> Path:
    return s.home_abs / "api.pid"


# ---- the REST client -------------------------------------------------------


# What to run next, after an error of this code.
NEXT_STEP = {
    "region_unavailable": "`pgfleet status` shows which servers and routers are down "
    "(`pgfleet up` restarts the embedded fleet's)",
    "platform_unavailable": "`pgfleet status` shows the platform database's state",
}


class Client:
    def __init__(self, url: str | None, token: str | None) -> None:
        s = load_settings()
        url_where_from = "--url or PGFLEET_URL"
        if url is None:
            f = api_file(s)
            url_where_from = str(f)
            try:
                url = (
                    str(json.loads(f.read_text())["url"])
                    if f.exists()
                    else f"http://{s.api_host}:{s.api_port}"
                )
            except (OSError, ValueError, KeyError, TypeError) as e:
                fail(f"cannot read the API's address from {f}: {e}; pass --url")
        where_from = "--token or PGFLEET_TOKEN"
        if token is None and token_file(s).exists():
            where_from = str(token_file(s))
            try:
                token = token_file(s).read_text().strip()
            except (OSError, ValueError) as e:
                fail(f"cannot read the API token from {where_from}: {e}; pass --token")
        if not token:
            fail(
                "no API token: pass --token, set PGFLEET_TOKEN, or run `pgfleet up` "
                "to create the admin token"
            )
        odd = next((i for i, c in enumerate(token) if not (c.isascii() and c.isprintable())), None)
        if odd is not None:
            fail(
                f"the API token from {where_from} holds a character that is not printable "
                f"ASCII at position {odd + 1} ({printable(repr(token[odd]))}); tokens are "
                "printable ASCII (a space or a quote pasted with it?)"
            )
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, UnicodeError) as e:
            fail(f"the API address {url!r} from {url_where_from} is not a URL: {e}")
        if parsed.scheme not in ("http", "https") or not parsed.host:
            fail(
                f"the API address {url!r} from {url_where_from} is not an http:// or https:// URL "
                "with a host (like http://127.0.0.1:8470)"
            )
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(
        self, method: str, path: str, *, flags: dict[str, str] | None = None, **kw: Any
    ) -> Any:
        """The API's answer (its error, if any, ends the command). A project
        in the path may be named by its id, a unique id prefix or its name.
        `flags` names the command's options by the API fields they fill: an
        error about a field then names the option the user typed."""
        m = _PROJECT_PATH.match(path)
        if m and not UUID_RE.fullmatch(m.group(1)):
            path = f"/v1/projects/{self.project_id(m.group(1))}{m.group(2)}"
        return self._request(method, path, flags=flags, **kw)

    def project_id(self, ref: str) -> str:
        """The id of the one project `ref` names: its name (a live project's
        first), or a unique prefix of its id; none or several is an error
        that says what matched."""
        projects = self._request("GET", "/v1/projects", params={"include_deleted": "true"})[
            "projects"
        ]
        named = [p for p in projects if p["name"] == ref]
        live = [p for p in named if p["status"] != "deleted"]
        prefixed = [p for p in projects if p["id"].startswith(ref.lower())]
        for found in (live, named, prefixed):
            if len(found) == 1:
                return str(found[0]["id"])
            if len(found) > 1:
                listed = "; ".join(f"{p['id']} ({p['name']}, {p['status']})" for p in found[:10])
                fail(f"{ref!r} names {len(found)} projects: {listed}. Give its whole id")
        fail(
            f"no project is named {ref!r} or has an id starting with it; "
            "`pgfleet projects list` shows yours (`--all` with the deleted ones)"
        )

    def resolve(
        self, ref: str, listing: str, key: str, what: str, params: dict[str, Any] | None = None
    ) -> str:
        """The id of the one `what` among `listing`'s answer (its `key` list)
        that `ref` names: a whole id as it is, else its name or a unique
        prefix of its id, as projects are named."""
        if UUID_RE.fullmatch(ref.lower()):
            return ref
        if not ref.strip():
            fail(f"give a {what}'s id, a prefix of it or its name")
        items = self._request("GET", listing, params=params)[key]
        # Live ones first (a revoked token's name or prefix does not make a
        # live one's ambiguous); a name and another's id prefix both matching
        # is ambiguous, never a silent pick.
        live = [x for x in items if not x.get("revoked_at")]
        for pool in (live, items):
            found = {
                str(x["id"]): x
                for x in pool
                if x.get("name") == ref or str(x["id"]).startswith(ref.lower())
            }
            if len(found) == 1:
                return next(iter(found))
            if len(found) > 1:
                listed = "; ".join(
                    f"{i} ({x.get('name') or '-'})" for i, x in list(found.items())[:10]
                )
                fail(f"{ref!r} names {len(found)} {what}s: {listed}. Give more of its id")
        among = f" among the newest {params['limit']}" if params and "limit" in params else ""
        fail(f"no {what}{among} is named {ref!r} or has an id starting with it")

    def _request(
        self, method: str, path: str, *, flags: dict[str, str] | None = None, **kw: Any
    ) -> Any:
        try:
            with httpx.Client(base_url=self.url, timeout=60, headers=self.headers) as http:
                r = http.request(method, path, **kw)
        except httpx.TransportError:
            fail(f"cannot reach the pgfleet API at {self.url}; is it running (`pgfleet up`)?")
        except (UnicodeError, httpx.InvalidURL) as e:  # text no request can carry
            fail(f"the request could not be made: {e}")
        if r.status_code >= 400:
            try:
                error = r.json()["error"]
                msg, code = error["message"], error["code"]
            except (ValueError, KeyError, TypeError):
                msg, code = r.text[:500], None
            for field, flag in (flags or {}).items():
                # "target_time: ..." or "query.status: ...", where a message
                # or one of its parts starts: the option, as typed.
                msg = re.sub(
                    rf"(^|; )(?:query\.|body\.)?{re.escape(field)}\b", rf"\g<1>{flag}", msg
                )
            hint = NEXT_STEP.get(code or "")
            fail(f"{msg} (HTTP {r.status_code})" + (f"\n{hint}" if hint else ""))
        return r.json() if r.content else None


def add_row(table: Table, *cells: object) -> None:
    """Add a row whose cells are shown as plain text: never Rich markup, and
    never a control character (see `printable`)."""
    table.add_row(
        *[
            Text(printable(c.plain)) if isinstance(c, Text) else Text(printable(str(c)))
            for c in cells
        ]
    )


def print_json(data: Any) -> None:
    """JSON on stdout; timestamps in ISO 8601 with their zone. Characters
    that would act on a terminal (see printable) as JSON escapes."""
    document = json.dumps(data, indent=2, ensure_ascii=False, default=_iso)
    sys.stdout.write(printable_json(document) + "\n")


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def print_audit(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        return print_json(data)
    t = Table(title="Audit log")
    for col in ("at", "actor", "action", "project", "operation", "details"):
        t.add_column(col)
    for e in data["entries"]:
        add_row(
            t,
            when(e["at"]),
            e["actor"],
            e["action"],
            e["project_id"] or "-",
            e["operation_id"] or "-",
            json.dumps(e["details"], ensure_ascii=False),
        )
    out.print(t)
