"""Values out of PostgreSQL into JSON that round-trips (numerics as strings,
timestamps ISO 8601, bytea base64, NULL as null), what psycopg cannot load
kept as PostgreSQL's text, and the one place that extends a private psycopg
step (`StatementCursor`): tested against the psycopg versions pyproject
allows."""

from __future__ import annotations

import base64
import datetime as dt
import math
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.abc import PQGen
from psycopg.generators import fetch
from psycopg.pq import ExecStatus
from psycopg.pq.abc import PGresult
from psycopg.types import datetime as pgdt


def to_json(value: Any) -> Any:
    """A JSON value that round-trips: numerics as strings, timestamps ISO 8601,
    bytea base64, NULL as null."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        # PostgreSQL's own spellings, which it reads back.
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return _iso_duration(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return str(value)
    return str(value)


def _iso_duration(td: dt.timedelta) -> str:
    seconds = td.total_seconds()
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    return f"{sign}P{int(days)}DT{int(hours)}H{int(minutes)}M{secs:g}S"


class StatementCursor(psycopg.AsyncRawCursor[Any]):
    """stream() for any one statement: rows are read in chunks (so caps stop
    the read early), and statements without rows (INSERT, DDL) are fine and
    keep their command tag. Overrides psycopg's private stream step; tested
    against the psycopg versions pyproject allows."""

    final: PGresult | None = None

    def _stream_fetchone_gen(self, first: bool) -> PQGen[PGresult | None]:
        res: PGresult | None = yield from fetch(self._pgconn)
        if res is None:
            return None
        status = res.status
        if status in (ExecStatus.SINGLE_TUPLE, ExecStatus.TUPLES_CHUNK):
            self.pgresult = res
            self._tx.set_pgresult(res, set_loaders=first)
            if first:
                self._make_row = self._make_row_maker()
            return res
        if status in (ExecStatus.TUPLES_OK, ExecStatus.COMMAND_OK):
            self.final = res
            if self.pgresult is None:
                self.pgresult = res
            while res:
                res = yield from fetch(self._pgconn)
            return None
        return self._raise_for_result(res)


class _TextFallbackMixin:
    """Load a value with psycopg's loader, or keep PostgreSQL's text when
    Python cannot hold it (infinity, years past 9999, BC dates)."""

    def load(self, data: Any) -> Any:
        try:
            return super().load(data)  # type: ignore[misc]
        except (psycopg.DataError, ValueError, OverflowError):
            return bytes(data).decode()


class _TextLoader(psycopg.adapt.Loader):
    def load(self, data: Any) -> str:
        return bytes(data).decode()


def _loaders() -> list[tuple[str, type[psycopg.adapt.Loader]]]:
    out: list[tuple[str, type[psycopg.adapt.Loader]]] = [
        # An interval has months, days and time; Python's timedelta has only
        # days, so '1 year' would come back as 365 days. Keep the server's text.
        ("interval", _TextLoader),
    ]
    for name, base in (
        ("date", pgdt.DateLoader),
        ("timestamp", pgdt.TimestampLoader),
        ("timestamptz", pgdt.TimestamptzLoader),
    ):
        out.append((name, type(f"Safe{base.__name__}", (_TextFallbackMixin, base), {})))
    return out


_SQL_LOADERS = _loaders()


_TYPE_NAMES: dict[tuple[uuid.UUID, int], str] = {}


async def type_names(
    conn: psycopg.AsyncConnection[Any], tenant_id: uuid.UUID, description: Sequence[Any]
) -> list[dict[str, str]]:
    """Column names and types. Types psycopg does not know (enums, domains,
    extensions: it shows their OID) are named by the server, cached per project."""
    for c in description:
        key = (tenant_id, c.type_code)
        if c.type_display.isdigit() and key not in _TYPE_NAMES:
            cur = await conn.execute("SELECT pg_catalog.format_type(%s, NULL)", (c.type_code,))
            row = await cur.fetchone()
            if len(_TYPE_NAMES) > 50_000:
                _TYPE_NAMES.clear()
            _TYPE_NAMES[key] = row[0] if row else c.type_display
    return [
        {
            "name": c.name,
            "type": _TYPE_NAMES.get((tenant_id, c.type_code), c.type_display)
            if c.type_display.isdigit()
            else c.type_display,
        }
        for c in description
    ]


async def configure_loaders(conn: psycopg.AsyncConnection[Any]) -> None:
    for name, loader in _SQL_LOADERS:
        conn.adapters.register_loader(name, loader)
