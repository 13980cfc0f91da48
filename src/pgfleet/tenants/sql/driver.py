"""The HTTP protocol of the Neon serverless driver (`@neondatabase/serverless`
on npm), served by the SQL API's machinery, so an edge or serverless app that
uses the driver's `neon()` moves to pgfleet by changing its connection string
and `neonConfig.fetchEndpoint`.

The contract, as the driver (1.2.0, the version the tests pin) uses it:

- `POST /sql`. The project's credentials come in `Neon-Connection-String`
  (`postgresql://user:password@host/database`); the database names the
  project, the host is not used. The body is JSON whatever its content type
  (the driver sends none): `{"query", "params"}`, or `{"queries": [...]}`
  for `transaction()`, with `Neon-Batch-Isolation-Level`,
  `Neon-Batch-Read-Only` and `Neon-Batch-Deferrable`. Params are strings or
  null, passed to PostgreSQL untyped, as text.
- The answer: `{"fields": [{"name", "dataTypeID", "tableID", "columnID",
  "dataTypeSize", "dataTypeModifier", "format"}], "rows": [[text or null]],
  "command", "rowCount", "rowAsArray"}` (or `{"results": [...]}`), values as
  PostgreSQL's own text output: the driver parses them by type OID with
  node-postgres's parsers, so they become the same JavaScript values as
  through node-postgres itself. (Array mode and full results are the
  driver's own business: it always asks for arrays of raw text.)
- Errors it turns into its `NeonDbError`: HTTP 400 with `message` and
  PostgreSQL's fields (`code`, `detail`, `hint`, `position`, ...). Any other
  status it reports as "Server error (HTTP status N): <body>".

The password is checked the way PostgreSQL checks it: against the role's
SCRAM verifier on the project's server (and its LOGIN and VALID UNTIL), so
every credential that logs in over TCP works here and no other: the current
rw and ro passwords, and an old one during a rotation's overlap window. The
statements then run exactly as the SQL API's do (the project's own role,
its plan's timeout and caps, query logging with route `rw` or `ro`); a
result over the caps is an error here (the protocol cannot say
"truncated") and changes nothing (see driver_runner). Every failure to
authenticate looks the same (28P01), whether the database, the role or the
password was wrong.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg

from pgfleet.tenants.sql.limits import MAX_PARAMS, MAX_QUERY_CHARS, SqlRequest

ISOLATION_LEVELS = {
    "ReadUncommitted": "READ UNCOMMITTED",
    "ReadCommitted": "READ COMMITTED",
    "RepeatableRead": "REPEATABLE READ",
    "Serializable": "SERIALIZABLE",
}

# What the driver copies from an error body into its NeonDbError.
ERROR_FIELDS = (
    "severity",
    "code",
    "detail",
    "hint",
    "position",
    "internalPosition",
    "internalQuery",
    "where",
    "schema",
    "table",
    "column",
    "dataType",
    "constraint",
    "file",
    "line",
    "routine",
)
MAX_BATCH = 100


class DriverError(Exception):
    """An answer the driver turns into a NeonDbError (HTTP 400 with
    PostgreSQL's fields), or, with another status, into its "Server error"."""

    def __init__(
        self, message: str, *, code: str | None = None, status: int = 400, **fields: Any
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.fields: dict[str, Any] = {"code": code, "severity": "ERROR", **fields}

    def body(self) -> dict[str, Any]:
        return {"message": self.message, **{k: self.fields.get(k) for k in ERROR_FIELDS}}


def refused(user: str) -> DriverError:
    """The one answer to every failed login: which part was wrong is not said."""
    return DriverError(
        f'password authentication failed for user "{user}"', code="28P01", severity="FATAL"
    )


def from_postgres(e: psycopg.Error) -> DriverError:
    """A PostgreSQL error with every field the driver reads."""
    d = e.diag
    return DriverError(
        d.message_primary or str(e).strip(),
        code=e.sqlstate,
        severity=d.severity or "ERROR",
        detail=d.message_detail,
        hint=d.message_hint,
        position=d.statement_position,
        internalPosition=d.internal_position,
        internalQuery=d.internal_query,
        where=d.context,
        schema=d.schema_name,
        table=d.table_name,
        column=d.column_name,
        dataType=d.datatype_name,
        constraint=d.constraint_name,
        file=d.source_file,
        line=d.source_line,
        routine=d.source_function,
    )


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)
    database: str

    @property
    def cache_key(self) -> bytes:
        """What a verified login is remembered by (never the password itself)."""
        return hashlib.sha256(
            b"\0".join(v.encode() for v in (self.user, self.password, self.database))
        ).digest()


@dataclass(frozen=True)
class Batch:
    """`transaction()`: its statements and the transaction's options."""

    isolation: str | None = None
    read_only: bool | None = None
    deferrable: bool | None = None

    def begin(self, mode: str) -> str:
        parts = ["BEGIN"]
        if self.isolation is not None:
            parts.append(f"ISOLATION LEVEL {ISOLATION_LEVELS[self.isolation]}")
        if self.read_only or mode == "ro":
            parts.append("READ ONLY")
        elif self.read_only is False:
            parts.append("READ WRITE")
        if self.deferrable is not None:
            parts.append("DEFERRABLE" if self.deferrable else "NOT DEFERRABLE")
        return " ".join(parts)


@dataclass(frozen=True)
class DriverCall:
    credentials: Credentials
    queries: list[SqlRequest]
    batch: Batch | None  # None: a single query


def parse_connection_string(value: str | None) -> Credentials:
    if not value:
        raise DriverError(
            "no Neon-Connection-String header: send the project's connection string "
            "(postgresql://user:password@host/database) in it",
            code="08004",
        )
    try:
        url = urlsplit(value.strip())
        user = unquote(url.username or "")
        password = unquote(url.password or "")
        database = unquote(url.path.lstrip("/"))
    except ValueError:
        url, user, password, database = None, "", "", ""
    if url is None or url.scheme not in ("postgres", "postgresql") or not (user and database):
        raise DriverError(
            "Neon-Connection-String is not a connection string: expected "
            "postgresql://user:password@host/database",
            code="08004",
        )
    return Credentials(user, password, database)


def _flag(headers: Mapping[str, str], name: str) -> bool | None:
    value = headers.get(name)
    if value is None:
        return None
    if value not in ("true", "false"):
        raise DriverError(f"{name} must be true or false, not {value!r}", code="22023")
    return value == "true"


def _text(value: str, where: str) -> str:
    """`value` if PostgreSQL can take it as text: no NUL, no lone surrogate."""
    if "\x00" in value:
        raise DriverError(
            f'{where}: invalid byte sequence for encoding "UTF8": 0x00 (text cannot hold NUL)',
            code="22021",
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DriverError(
            f"{where}: a lone surrogate (\\ud800-\\udfff) is not a character", code="22021"
        ) from None
    return value


def _request(item: Any, where: str) -> SqlRequest:
    if not isinstance(item, dict) or not isinstance(item.get("query"), str):
        raise DriverError(f"{where} must be an object with a string query", code="08P01")
    params = item.get("params", [])
    if params is None:
        params = []
    if not isinstance(params, list):
        raise DriverError(f"{where}.params must be an array", code="08P01")
    if len(item["query"]) > MAX_QUERY_CHARS:
        raise DriverError(
            f"{where}.query is {len(item['query'])} characters; at most {MAX_QUERY_CHARS}",
            code="54000",
        )
    if len(params) > MAX_PARAMS:
        raise DriverError(f"{where}: at most {MAX_PARAMS} params are allowed", code="54000")
    out: list[str | None] = []
    for i, p in enumerate(params):
        # The driver sends strings or null; other JSON values are taken as
        # their text, as PostgreSQL would read them.
        if p is None:
            out.append(None)
        elif isinstance(p, str):
            out.append(_text(p, f"{where}.params[{i}]"))
        elif isinstance(p, bool):
            out.append("true" if p else "false")
        elif isinstance(p, int | float):
            out.append(json.dumps(p))
        else:
            out.append(_text(json.dumps(p, separators=(",", ":")), f"{where}.params[{i}]"))
    return SqlRequest(query=_text(item["query"], f"{where}.query"), params=out)


def parse_call(headers: Mapping[str, str], raw: bytes) -> DriverCall:
    """A request as the driver sends it (`headers` with lower-case names)."""
    credentials = parse_connection_string(headers.get("neon-connection-string"))
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise DriverError(
            'the body is not JSON: expected {"query": ..., "params": [...]} or {"queries": [...]}',
            code="08P01",
        ) from None
    if isinstance(body, dict) and "queries" in body:
        items = body["queries"]
        if not isinstance(items, list):
            raise DriverError("queries must be an array", code="08P01")
        if len(items) > MAX_BATCH:
            raise DriverError(
                f"a transaction may hold at most {MAX_BATCH} queries, not {len(items)}",
                code="54000",
            )
        isolation = headers.get("neon-batch-isolation-level")
        if isolation is not None and isolation not in ISOLATION_LEVELS:
            raise DriverError(
                f"invalid isolation level {isolation!r}: one of {', '.join(ISOLATION_LEVELS)}",
                code="22023",
            )
        batch = Batch(
            isolation=isolation,
            read_only=_flag(headers, "neon-batch-read-only"),
            deferrable=_flag(headers, "neon-batch-deferrable"),
        )
        queries = [_request(q, f"queries[{i}]") for i, q in enumerate(items)]
        return DriverCall(credentials, queries, batch)
    return DriverCall(credentials, [_request(body, "the body")], None)


def row_count(command: str) -> int | None:
    """The count at the end of a command tag (`INSERT 0 3` -> 3), or None."""
    last = command.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() and " " in command else None


def result_body(
    fields: list[dict[str, Any]], rows: list[list[Any]], command: str, count: int | None
) -> dict[str, Any]:
    return {
        "fields": fields,
        "rows": rows,
        "command": command.split(" ", 1)[0],
        "rowCount": count,
        "rowAsArray": True,
    }
