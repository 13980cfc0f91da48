"""Values out of PostgreSQL into JSON that round-trips (numerics as strings,
timestamps ISO 8601, bytea base64, NULL as null), what psycopg cannot load
kept as PostgreSQL's text, and the one place that extends a private psycopg
step (`StatementCursor`): tested against the psycopg versions pyproject
allows."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime as dt
import glob
import importlib
import math
import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from decimal import Decimal
from typing import Any, NamedTuple

import psycopg
from psycopg.abc import PQGen
from psycopg.generators import fetch
from psycopg.pq import ExecStatus, TransactionStatus
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


def _libpq_getlength() -> Callable[[int, int, int], int] | None:
    """libpq's PQgetlength, from the libpq psycopg itself uses: a value's
    length without copying it (psycopg's PGresult only hands out copies).
    None where that libpq cannot be found; rows are then not size-checked
    before they are loaded."""
    try:
        impl = psycopg.pq.__impl__
        if impl == "binary":
            # The wheel bundles its own libpq; opening the same file again
            # returns the library already loaded.
            binary = importlib.import_module("psycopg_binary")
            libs = os.path.join(os.path.dirname(str(binary.__file__)), "..", "psycopg_binary.libs")
            found = glob.glob(os.path.join(libs, "libpq-*.so*"))
            if len(found) != 1:
                return None
            lib = ctypes.CDLL(found[0])
        elif impl == "python":
            lib = importlib.import_module("psycopg.pq._pq_ctypes").pq
        else:
            return None
        # A function object of our own (indexing, unlike attribute access,
        # does not return the one psycopg configured).
        fn = lib["PQgetlength"]
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn
    except (ImportError, OSError, AttributeError):
        return None


_GETLENGTH = _libpq_getlength()


class Oversized(NamedTuple):
    """A row `rows()` did not load: its raw text alone is over the limit."""

    raw_bytes: int


class StatementCursor(psycopg.AsyncRawCursor[Any]):
    """stream() for any one statement: rows are read in chunks (so caps stop
    the read early), and statements without rows (INSERT, DDL) are fine and
    keep their command tag. Overrides psycopg's private stream step; tested
    against the psycopg versions pyproject allows."""

    final: PGresult | None = None

    async def rows(
        self,
        query: Any,
        params: Sequence[Any],
        *,
        size: int,
        max_raw_row: int,
        text: bool = False,
    ) -> AsyncIterator[Any]:
        """psycopg's stream(), except that a row whose raw text is over
        `max_raw_row` bytes is not loaded: Oversized stands in for it. libpq
        holds the row already (a row arrives whole); decoding it and turning
        it into JSON would take two or three times that again, for a row the
        caps would drop anyway. With `text`, a row is PostgreSQL's own text
        of each value (None for NULL), as it came."""
        encoding = self._conn.info.encoding
        async with self._conn.lock:
            first = True
            try:
                await self._conn.wait(self._stream_send_gen(query, params, size=size))
                while res := await self._conn.wait(self._stream_fetchone_gen(first)):
                    # Only variable-length columns can be large.
                    varlen = [c for c in range(res.nfields) if res.fsize(c) < 0]
                    length = _GETLENGTH if varlen else None
                    ptr: int = getattr(res, "pgresult_ptr", None) or 0
                    for pos in range(res.ntuples):
                        if length is not None and ptr:
                            raw = sum(length(ptr, pos, c) for c in varlen)
                            if raw > max_raw_row:
                                yield Oversized(raw)
                                continue
                        if text:
                            yield [
                                None if (v := res.get_value(pos, c)) is None else v.decode(encoding)
                                for c in range(res.nfields)
                            ]
                            continue
                        yield self._tx.load_row(pos, self._make_row)
                    first = False
            finally:
                # As psycopg's stream(): a statement left running (the caller
                # stopped reading) is cancelled and what arrived is drained.
                if self._pgconn.transaction_status == TransactionStatus.ACTIVE:
                    await self._conn.cancel_safe(timeout=5)
                    with contextlib.suppress(Exception):
                        while await self._conn.wait(self._stream_fetchone_gen(first=False)):
                            pass
                    with contextlib.suppress(Exception):
                        await self._conn.wait(self._stream_fetchone_gen(first=False))

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


def fields_of(res: Any) -> list[dict[str, Any]]:
    """The HTTP driver's field descriptions (node-postgres's), from a libpq result."""
    if res is None:
        return []
    return [
        {
            "name": (res.fname(i) or b"").decode(),
            "dataTypeID": res.ftype(i),
            "tableID": res.ftable(i),
            "columnID": res.ftablecol(i),
            "dataTypeSize": res.fsize(i),
            "dataTypeModifier": res.fmod(i),
            "format": "text",
        }
        for i in range(res.nfields)
    ]


async def configure_loaders(conn: psycopg.AsyncConnection[Any]) -> None:
    for name, loader in _SQL_LOADERS:
        conn.adapters.register_loader(name, loader)
