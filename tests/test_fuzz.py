"""Fuzzing: schemathesis generates requests (valid and invalid) for every
operation of pgfleet's own OpenAPI document and sends them, with an admin
token, to a real API process on the test fleet. No answer may be a 5xx, and
every answer must match the document (status codes, content types, bodies,
headers), requests it forbids must be refused, and requests without the
token must be refused too.

A bounded number of examples per operation keeps it part of every run."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance

from pgfleet.api.app import create_app
from pgfleet.auth import create_owner
from pgfleet.platform.core import Platform

EXAMPLES = 12

# The document the API serves at /openapi.json (no server is needed to make it).
schema = schemathesis.openapi.from_dict(create_app().openapi())
# Names pgfleet accepts: text with no control, format, private-use or
# unassigned characters, not only spaces (the document says `display-name`).
schemathesis.openapi.format(
    "display-name",
    st.text(
        st.characters(categories=("L", "M", "N", "P", "S", "Zs")), min_size=1, max_size=100
    ).filter(lambda s: s.strip()),
)
_token: dict[str, str] = {}


@schema.auth(refresh_interval=None)
class AdminToken:
    """The admin token of the test's platform: schemathesis knows it is the
    auth (so it also checks that requests without it are refused)."""

    def get(self, case: Any, ctx: Any) -> str:
        return _token.get("admin", "pgf_not_yet")

    def set(self, case: Any, data: str, ctx: Any) -> None:
        headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}
        if "Idempotency-Key" in headers and isinstance(headers["Idempotency-Key"], str):
            # A key reused with another body is refused (422) by design; the
            # generator repeats its few short keys across requests.
            headers["Idempotency-Key"] = f"fuzz-{uuid.uuid4()}"
        case.headers = headers


# The operations this process fuzzed: conftest.py fails the session if
# the fuzz test ran and some operation of the document was never called.
FUZZED: set[str] = set()


def all_operations() -> set[str]:
    return {r.ok().label for r in schema.get_all_operations()}


@pytest.fixture
def admin_token(platform: Platform) -> Iterator[str]:
    _, token = create_owner(platform, "fuzzer", is_admin=True)
    _token["admin"] = token
    yield token
    _token.clear()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_the_api_keeps_its_own_contract(case: Any, api_url: str, admin_token: str) -> None:
    # Every check but "schema-valid requests are accepted": some of what
    # pgfleet refuses (a timeout over the project's plan, a name made of
    # characters JSON Schema cannot tell apart) the document says in words.
    FUZZED.add(case.operation.label)
    case.call_and_validate(base_url=api_url, excluded_checks=[positive_data_acceptance])
