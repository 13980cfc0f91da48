"""Request dependencies: the Platform and the authenticated owner."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pgfleet.auth import authenticate
from pgfleet.errors import Forbidden, InvalidInput, read_only_refusal
from pgfleet.platform.core import Platform
from pgfleet.platform.owners import Owner

bearer = HTTPBearer(auto_error=False, description="An API token: `pgf_...`")


async def get_platform(request: Request) -> Platform:  # no I/O: no thread hop
    platform: Platform = request.app.state.platform
    return platform


PlatformDep = Annotated[Platform, Depends(get_platform)]


# What a read-only token (scope read) may do beyond GET: run SQL (the
# gateway then allows mode ro only).
_READ_ONLY_POSTS = re.compile(r"^/v1/projects/[^/]+/sql$")


def get_owner(
    request: Request,
    platform: PlatformDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Owner:
    owner = authenticate(platform, creds.credentials if creds else None)
    if (
        owner.read_only
        and request.method not in ("GET", "HEAD", "OPTIONS")
        and not _READ_ONLY_POSTS.match(request.url.path)
    ):
        raise read_only_refusal(f"{request.method} {request.url.path} changes something")
    return owner


OwnerDep = Annotated[Owner, Depends(get_owner)]


def get_admin(owner: OwnerDep) -> Owner:
    if not owner.is_admin:
        raise Forbidden("this needs an admin token")
    return owner


AdminDep = Annotated[Owner, Depends(get_admin)]


_QUERY_NAMES: dict[int, frozenset[str]] = {}


def _query_names(route: APIRoute) -> frozenset[str]:
    """The query parameters a route and its dependencies take (by route
    object: routes are made once, at start)."""
    known = _QUERY_NAMES.get(id(route))
    if known is not None:
        return known
    names: set[str] = set()
    todo = [route.dependant]
    while todo:
        dependant = todo.pop()
        names |= {p.alias for p in dependant.query_params}
        todo.extend(dependant.dependencies)
    _QUERY_NAMES[id(route)] = frozenset(names)
    return _QUERY_NAMES[id(route)]


async def known_query_parameters(request: Request) -> None:
    """A query parameter the route does not take is an error that names it
    (a typo such as `?regoin=` would otherwise be ignored in silence)."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.query_params:
        return
    unknown = sorted(set(request.query_params) - _query_names(route))
    if unknown:
        allowed = sorted(_query_names(route))
        raise InvalidInput(
            f"unknown query parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(u) for u in unknown)}; "
            + (f"this route takes: {', '.join(allowed)}" if allowed else "this route takes none"),
            field="query",
            unknown=unknown,
        )
