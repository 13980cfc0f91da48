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
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any

# Text a tenant wrote (a value, a statement, an error's words) is shown
# with every character that would act on the reader's terminal or page, or
# hide or reorder what is shown, as its escape:
# - control characters (C0, DEL, C1: category Cc): an escape sequence would
#   drive the terminal (clear it, retitle it, fake output); a tab or newline
#   would break the CLI's piped form's lines and columns;
# - format characters (Cf): bidirectional overrides, embeddings, isolates
#   and marks (`\u202e` makes `exe.txt` read as `txt.exe`), zero-width
#   spaces, word joiners, soft hyphens, the byte order mark, tag characters
#   (which can carry hidden ASCII); but not the zero-width joiner and
#   non-joiner, which scripts and emoji need;
# - line and paragraph separators (Zl, Zp), which some terminals break at;
# - the Hangul fillers, letters that show as blank space;
# - lone surrogates (Cs), which no terminal or page can show.
# The console shows them the same way (a browser would act on them too).
_SHOWN_AS_ESCAPES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_JOINERS = frozenset("\u200c\u200d")
_FILLERS = re.compile("[\u115f\u1160\u3164\uffa0]")


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _hidden(char: str) -> bool:
    return (
        unicodedata.category(char) in _SHOWN_AS_ESCAPES and char not in _JOINERS
    ) or _FILLERS.match(char) is not None


def _plain(text: str) -> bool:
    """Whether `text` holds nothing printable() escapes (most text: judged
    without looking at a character in Python)."""
    return text.isprintable() and _FILLERS.search(text) is None


def printable(text: str, *, lines: bool = False) -> str:
    r"""`text` with every character that would act on the reader's terminal
    or page, or hide or reorder what is shown, as its escape (`\x1b`,
    `\u202e`); with `lines`, newlines are kept."""
    if _plain(text):
        return text
    return "".join(_escape(c) if _hidden(c) and not (lines and c == "\n") else c for c in text)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000  # as JSON writes it: a surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def printable_json(document: str) -> str:
    """A JSON document (not ASCII-escaped) with the characters printable()
    escapes written as JSON escapes: the same data, that a terminal or page
    shows as it is. They can only be in its strings; its newlines are its
    layout (JSON escapes those in strings itself)."""
    if document.isascii() or _plain(document):
        return document
    return "".join(_json_escape(c) if c != "\n" and _hidden(c) else c for c in document)


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
