"""Normalised statement fingerprints: constants removed, whitespace and case
folded, so logs group by statement shape and never hold literal values."""

from __future__ import annotations

import functools
import re

# PostgreSQL's identifier characters: ASCII letters, underscore, and every
# character past ASCII (digits and `$` after the first). Dollar-quote tags
# follow the same rules without `$`, so `$täg$ ... $täg$` is one literal.
_START = "A-Za-z_\u0080-\U0010ffff"
_PART = _START + "0-9"
_TOKEN = re.compile(
    r"""
    (?P<line_comment>--[^\n]*)
  | (?P<block_comment>/\*)
  | (?P<dollar>\$(?P<tag>[START][PART]*|)\$.*?(?:\$(?P=tag)\$|\Z))
  | (?P<estring>[Ee]'(?:[^'\\]|\\.|'')*(?:'|\Z))
  | (?P<string>[BbXxNnUu]?&?'(?:[^']|'')*(?:'|\Z))
  | (?P<qident>"(?:[^"]|"")*(?:"|\Z))
  | (?P<param>\$\d+|%s|%\([^)]*\)s)
  | (?P<number>(?<![PART])(?:[0-9]+\.?[0-9]*(?:[eE][-+]?[0-9]+)?|\.[0-9]+(?:[eE][-+]?[0-9]+)?))
  | (?P<word>[START][PART$]*)
  | (?P<space>\s+)
  | (?P<other>.)
    """.replace("START", _START).replace("PART", _PART),
    re.VERBOSE | re.DOTALL,
)
_COMMENT_PART = re.compile(r"/\*|\*/")
_ROLE_STATEMENT = re.compile(r"(?:.*; ?)?\s*(?:create|alter) (?:role|user|group) ")

MAX_FINGERPRINT = 1000
_CACHED_CHARS = 2000


def _skip_block_comment(query: str, pos: int) -> int:
    """End of the (nestable) block comment opened just before `pos`."""
    depth = 1
    while depth:
        m = _COMMENT_PART.search(query, pos)
        if m is None:
            return len(query)
        depth += 1 if m.group() == "/*" else -1
        pos = m.end()
    return pos


def fingerprint(query: str) -> str:
    """`SELECT * FROM t WHERE id = 42 AND name = 'x'` -> `select * from t where id = ? and
    name = ?`. Lists of constants collapse: `in (1, 2, 3)` -> `in (?)`."""
    # Applications send the same statements again and again (with params):
    # remember the shapes of short ones.
    if len(query) <= _CACHED_CHARS:
        return _cached(query)
    return _fingerprint(query)


def _fingerprint(query: str) -> str:
    out: list[str] = []
    pos = 0
    # In a role statement, whatever comes after the word PASSWORD up to the
    # next space is a secret, quoted or not (`PASSWORD hunter2`, a typo, is
    # still one).
    redact = ""  # "next": the secret comes next; "in": inside it
    while pos < len(query):
        m = _TOKEN.match(query, pos)
        if m is None:  # pragma: no cover - `other` matches any character
            break
        kind = m.lastgroup
        pos = m.end()
        if kind == "block_comment":
            pos = _skip_block_comment(query, pos)
            kind = "space"
        blank = kind in ("line_comment", "space")
        if redact and not blank and m.group() != ";":
            if redact == "next":
                out.append("?")
            redact = "in"
            continue
        if redact == "in" or m.group() == ";":
            redact = ""
        if kind in ("line_comment", "space"):
            if out and out[-1] != " ":
                out.append(" ")
        elif kind in ("dollar", "estring", "string", "number", "param"):
            out.append("?")
        elif kind == "word":
            out.append(m.group().lower())
            if out[-1] == "password" and _ROLE_STATEMENT.match("".join(out)):
                redact = "next"
        else:
            out.append(m.group())
    text = "".join(out).strip()
    text = re.sub(r"\(\s+", "(", text)
    text = re.sub(r"\s+([),;])", r"\1", text)
    text = re.sub(r",\s*", ", ", text)
    text = re.sub(r"\(\?(?:, \?)+\)", "(?)", text)
    text = re.sub(r"\s+", " ", text).strip().rstrip(";").rstrip()
    return text[:MAX_FINGERPRINT]


_cached = functools.lru_cache(maxsize=4096)(_fingerprint)
