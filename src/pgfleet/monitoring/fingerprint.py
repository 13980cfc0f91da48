"""Normalised statement fingerprints: constants removed, whitespace and case
folded, so logs group by statement shape and never hold literal values."""

from __future__ import annotations

import re

_TOKEN = re.compile(
    r"""
    (?P<comment>--[^\n]*|/\*.*?\*/)
  | (?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*)?\$.*?\$(?P=tag)?\$)
  | (?P<estring>[Ee]'(?:[^'\\]|\\.|'')*'?)
  | (?P<string>[BbXxNn]?'(?:[^']|'')*'?)
  | (?P<qident>"(?:[^"]|"")*"?)
  | (?P<param>\$\d+|%s|%\([^)]*\)s)
  | (?P<number>(?<![A-Za-z_0-9])(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?))
  | (?P<word>[A-Za-z_][A-Za-z_0-9$]*)
  | (?P<space>\s+)
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)

MAX_FINGERPRINT = 1000


def fingerprint(query: str) -> str:
    """`SELECT * FROM t WHERE id = 42 AND name = 'x'` -> `select * from t where id = ? and
    name = ?`. Lists of constants collapse: `in (1, 2, 3)` -> `in (?)`."""
    out: list[str] = []
    for m in _TOKEN.finditer(query):
        kind = m.lastgroup
        if kind in ("comment", "space"):
            if out and out[-1] != " ":
                out.append(" ")
        elif kind in ("dollar", "estring", "string", "number", "param"):
            out.append("?")
        elif kind == "word":
            out.append(m.group().lower())
        else:
            out.append(m.group())
    text = "".join(out).strip()
    text = re.sub(r"\(\s+", "(", text)
    text = re.sub(r"\s+([),;])", r"\1", text)
    text = re.sub(r",\s*", ", ", text)
    text = re.sub(r"\(\?(?:, \?)+\)", "(?)", text)
    text = re.sub(r"\s+", " ", text).strip().rstrip(";").rstrip()
    return text[:MAX_FINGERPRINT]
