"""Rate limits: token buckets kept in each API process's memory.

- Authentication failures, per client address: once an address has failed
  `auth_failures_per_min` times in a row (a burst of that many, refilled at
  that rate), its requests that carry credentials are answered 429 until the
  bucket refills, without looking at the credentials (so guessing tokens
  costs the platform DB nothing).
- Requests, per credential (API token, console session; the client address
  when there is none): `rate_limit_per_s` for the management API and the
  console, `rate_limit_sql_per_s` for the SQL API, with a burst of twice that.
  The credential is read as authentication reads it (the token of a Bearer
  header in any case, the session cookie by its exact name); a request that
  carries both a token and a session is charged to both, so a second,
  made-up credential never gets a request past the limit of the real one.

Every answer over a limit is 429 with `Retry-After` (seconds) in the usual
error envelope. The limits are for all API processes of a host together:
each process enforces its share (limit / PGFLEET_API_WORKERS), as it does
for the tenant pool cap. Checking costs a dictionary lookup and a little
arithmetic per request, on the event loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgfleet.api.sqlpath import bearer_token
from pgfleet.config import Settings
from pgfleet.errors import RateLimited, to_http
from pgfleet.web.routes import console_error_page, wants_page
from pgfleet.web.session import COOKIE


class RateLimiter:
    """Token buckets by key: `rate` tokens a second, at most `burst` saved."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> float:
        """Take one token; 0 if it was there, else the seconds until it is."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1:
                self._store(key, tokens - 1, now)
                return 0.0
            self._store(key, tokens, now)
            return (1 - tokens) / self.rate

    def peek(self, key: str, now: float | None = None) -> float:
        """Seconds until `key` has a token again (0: it has one now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entry = self._buckets.get(key)
        if entry is None:
            return 0.0
        tokens = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


_SQL_PATH = re.compile(r"/v1/projects/[^/]+/sql|/sql")


class RateLimits:
    """The three limiters of one API process, from settings."""

    def __init__(self, settings: Settings) -> None:
        share = max(1, settings.api_workers)
        per_min = settings.rate_limit_auth_failures_per_min / share
        self.auth_failures = RateLimiter(per_min / 60, max(1.0, per_min))
        api = settings.rate_limit_per_s / share
        sql = settings.rate_limit_sql_per_s / share
        self.api = RateLimiter(api, max(1.0, 2 * api))
        self.sql = RateLimiter(sql, max(1.0, 2 * sql))


def _credentials(scope: Scope) -> tuple[list[str], bool]:
    """(the request's credentials as limiter keys, whether it carries one)."""
    keys: list[str] = []
    carries = False
    for name, value in scope["headers"]:
        if name == b"neon-connection-string":
            # The HTTP driver's login, as user@database (what it logs in as,
            # whatever the host or options beside it), by a digest. Its failed
            # logins are counted by database (api/sqlpath.py), not here: one
            # tenant's failures must not lock out another's app behind the
            # same address.
            keys.append("n:" + hashlib.sha256(_driver_login(value)).hexdigest())
        elif name == b"authorization":
            carries = True
            text = value.decode("latin-1")
            token = bearer_token(text)
            keys.append("t:" + (token if token is not None else text.strip()))
        elif name == b"cookie":
            session = cookie_parser(value.decode("latin-1")).get(COOKIE)
            if session:
                keys.append("s:" + session)
                carries = True
    if keys:
        return keys, carries
    if scope["method"] == "POST" and scope["path"] == "/signin":
        return keys, True  # a token typed into the sign-in form
    return keys, False


def _driver_login(header: bytes) -> bytes:
    try:
        url = urlsplit(header.decode("latin-1").strip())
        return f"{url.username}@{url.path}".encode()
    except ValueError:
        return header


class RateLimit:
    """ASGI middleware enforcing RateLimits (which it finds on app.state)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits: RateLimits | None = getattr(scope["app"].state, "limits", None)
        if limits is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = client[0] if client else "unknown"
        credentials, carries = _credentials(scope)
        if carries:
            wait = limits.auth_failures.peek(address)
            if wait > 0:
                await _refuse(
                    scope,
                    send,
                    wait,
                    f"too many failed sign-ins or bad tokens from {address}; "
                    f"try again in {math.ceil(wait)} s",
                )
                return
        limiter = limits.sql if _SQL_PATH.fullmatch(scope["path"]) else limits.api
        wait = max(limiter.take(key) for key in credentials or ["a:" + address])
        if wait > 0:
            rate = limiter.rate * scope["app"].state.platform.settings.api_workers
            await _refuse(
                scope,
                send,
                wait,
                f"over the rate limit of {rate:g} requests a second; retry in {math.ceil(wait)} s",
            )
            return
        status = [0]

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status[0] == 401 and carries:
            limits.auth_failures.take(address)


async def _refuse(scope: Scope, send: Send, wait: float, message: str) -> None:
    retry = str(max(1, math.ceil(wait)))
    err = RateLimited(message, retry_after_s=int(retry))
    headers: list[tuple[bytes, bytes]] = [(b"retry-after", retry.encode())]
    body: bytes
    accept = next((v for k, v in scope["headers"] if k == b"accept"), b"").decode("latin-1")
    if wants_page(scope["path"], accept):
        page = console_error_page(err)
        body = bytes(page.body)
        headers.append((b"content-type", b"text/html; charset=utf-8"))
    else:
        body = json.dumps(to_http(err)[1]).encode()
        headers.append((b"content-type", b"application/json"))
    headers.append((b"content-length", str(len(body)).encode()))
    start: dict[str, Any] = {"type": "http.response.start", "status": 429, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body})
