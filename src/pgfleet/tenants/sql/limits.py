"""What one SQL API call may be: one statement (no transaction control, no
COPY), within the plan's timeout, rows and bytes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pgfleet.errors import InvalidInput
from pgfleet.regions import get_plan

MAX_QUERY_CHARS = 100_000


MAX_PARAMS = 1000


DEFAULT_TIMEOUT_MS = 10_000


DEFAULT_MAX_ROWS = 1000


@dataclass(frozen=True)
class SqlRequest:
    query: str
    params: Sequence[Any] = ()
    mode: str = "rw"
    timeout_ms: int | None = None
    max_rows: int | None = None


@dataclass
class SqlResult:
    columns: list[dict[str, Any]]
    rows: list[list[Any]]
    row_count: int
    truncated: bool
    duration_ms: float
    command: str
    mode: str
    limits: dict[str, int] = field(default_factory=dict)
    approx_bytes: int = 0  # the rows' JSON size, for the answer's encoding


def plan_limits(plan_type: str | None) -> dict[str, int]:
    plan = get_plan(plan_type or "free")
    return {
        "max_timeout_ms": plan.statement_timeout_ms,
        "max_rows": plan.max_result_rows,
        "max_bytes": plan.max_result_bytes,
    }


def check_request(req: SqlRequest, limits: dict[str, int]) -> tuple[int, int]:
    if not req.query.strip():
        raise InvalidInput("query must not be empty", field="query")
    if len(req.query) > MAX_QUERY_CHARS:
        raise InvalidInput(
            f"query is {len(req.query)} characters; at most {MAX_QUERY_CHARS} are allowed",
            field="query",
        )
    if len(req.params) > MAX_PARAMS:
        raise InvalidInput(f"at most {MAX_PARAMS} params are allowed", field="params")
    for p in req.params:
        if isinstance(p, dict | list):
            raise InvalidInput(
                "params must be strings, numbers, booleans or null "
                "(pass JSON as a string and cast it: $1::jsonb)",
                field="params",
            )
    timeout = req.timeout_ms if req.timeout_ms is not None else DEFAULT_TIMEOUT_MS
    timeout = min(timeout, limits["max_timeout_ms"]) if req.timeout_ms is None else timeout
    if not 1 <= timeout <= limits["max_timeout_ms"]:
        raise InvalidInput(
            f"timeout_ms must be between 1 and {limits['max_timeout_ms']} on this plan",
            field="timeout_ms",
        )
    rows = req.max_rows if req.max_rows is not None else min(DEFAULT_MAX_ROWS, limits["max_rows"])
    if not 0 <= rows <= limits["max_rows"]:
        raise InvalidInput(
            f"max_rows must be between 0 and {limits['max_rows']} on this plan",
            field="max_rows",
        )
    return timeout, rows


# Statements that need a session of their own: each SQL API call is one
# statement in its own transaction, and results come back as rows.
_UNSUPPORTED = {
    "begin": "transaction control",
    "start": "transaction control",
    "commit": "transaction control",
    "end": "transaction control",
    "rollback": "transaction control",
    "abort": "transaction control",
    "savepoint": "transaction control",
    "release": "transaction control",
    "prepare transaction": "transaction control",
    "copy": "COPY",
}


def first_word(shape: str) -> str:
    """A statement's command word, past empty statements (`;COMMIT` is a
    COMMIT: PostgreSQL skips the empty one before it)."""
    return shape.lstrip("; \t\r\n").split(" ", 1)[0].rstrip(";")


def refuse_unsupported(shape: str) -> None:
    first = first_word(shape)
    if first == "prepare" and shape.lstrip("; \t\r\n").startswith("prepare transaction"):
        first = "prepare transaction"
    what = _UNSUPPORTED.get(first)
    if what is not None:
        raise InvalidInput(
            f"{what} ({first.upper()}) is not available through the SQL API: every call is "
            "one statement in its own transaction; use the connection string for sessions "
            "and COPY",
            field="query",
        )
