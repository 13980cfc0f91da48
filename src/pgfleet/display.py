"""Values of the SQL API's JSON as a person reads them (the CLI's tables and
the console's SQL results): NULL as NULL, JSON as JSON, bytea in
PostgreSQL's hex format (`\\x...`, as psql shows it), booleans as true and
false. The API's own JSON encoding stays as documented (bytea base64).
Moments and durations as a person reads them, in the CLI and the console."""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

# Control characters (C0, DEL, C1): a cell's text can be a tenant's (a
# statement, a value), and an escape sequence in it would drive the reader's
# terminal (clear it, retitle it, fake output); a tab or newline would break
# the CLI's piped form's lines and columns. The console shows them the same
# way (a browser would show a box, or nothing).
# C0 and C1 controls, and the characters that reorder or hide text as it is
# shown: bidirectional marks, embeddings, overrides and isolates (a tenant's
# `\u202e` turns `exe.txt` into what reads as `txt.exe`), and the line and
# paragraph separators some terminals break lines at.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str, *, lines: bool = False) -> str:
    r"""`text` with every control character shown as its escape (`\x1b`,
    `\u202e` for a bidirectional override); with `lines`, newlines are
    kept."""
    return _CONTROL.sub(
        lambda m: m.group() if lines and m.group() == "\n" else _escape(m.group()),
        text,
    )


def display(value: Any, type_name: str = "") -> str:
    if value is None:
        return "NULL"
    if type_name.lower() == "bytea" and isinstance(value, str):
        try:
            return "\\x" + base64.b64decode(value, validate=True).hex()
        except (binascii.Error, ValueError):
            return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def when(value: str | datetime | None, *, round_up: bool = False) -> str:
    """A moment as a person reads it, always with its zone: the API's ISO
    8601 (UTC) as `2026-11-30 09:16:02 UTC`; `-` for none. To the second,
    down, or with `round_up` up: a window's start shown so is inside it, and
    copied back in as a target it is taken."""
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return value
    else:
        moment = value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if round_up and moment.microsecond:
        moment = moment.replace(microsecond=0) + timedelta(seconds=1)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(ms: float | None) -> str:
    """A duration as a person reads it: `412 ms`, `3.2 s`, `4 min 05 s`,
    `2 h 03 min`, `3 d 4 h`; `-` for none."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f} ms" if ms >= 10 or ms == int(ms) else f"{ms:.1f} ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f} s"
    total = int(s)
    if total < 3600:
        return f"{total // 60} min {total % 60:02d} s"
    if total < 86400:
        return f"{total // 3600} h {total % 3600 // 60:02d} min"
    return f"{total // 86400} d {total % 86400 // 3600} h"


def size(n: int | None) -> str:
    """A number of bytes as a person reads it: `812 B`, `5.4 kB`, `1.2 GB`;
    `-` for none."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
