"""Helpers the test files share (fixtures stay in conftest.py)."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from tests.conftest import Api


def create(api: Api, name: str = "shop", **kw: Any) -> Any:
    kw.setdefault("region", "us-east-1")
    kw.setdefault("plan_type", "free")
    params = kw.pop("params", None)
    headers = kw.pop("headers", {})
    return api.post("/v1/projects", json={"name": name, **kw}, params=params, headers=headers)


def create_ok(api: Api, name: str = "shop", **kw: Any) -> dict[str, Any]:
    r = create(api, name, **kw)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def error_of(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    return err


def poll(api: Api, op_id: str, timeout: float = 30) -> dict[str, Any]:
    """The operation once it ended."""
    end = time.monotonic() + timeout
    while True:
        op: dict[str, Any] = api.get(f"/v1/operations/{op_id}").json()
        if op["status"] in ("finished", "failed", "cancelled"):
            return op
        assert time.monotonic() < end, op
        time.sleep(0.05)


def finished(api: Api, r: Any) -> dict[str, Any]:
    """The operation a 200/201/202 answer started, once it finished."""
    assert r.status_code in (200, 201, 202), r.text
    body = r.json()
    op_id = body["operation"]["id"] if "operation" in body else body["id"]
    op = poll(api, op_id)
    assert op["status"] == "finished", op
    return op


def connect(connection: dict[str, Any], **kw: Any) -> psycopg.Connection[Any]:
    """A session with the credentials an API answer handed out."""
    return psycopg.connect(connection["uri"], autocommit=True, connect_timeout=5, **kw)
