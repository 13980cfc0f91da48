"""Request dependencies: the Platform and the authenticated owner."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pgfleet.auth import authenticate
from pgfleet.errors import Forbidden
from pgfleet.platform.core import Platform
from pgfleet.tenants.service import Owner

bearer = HTTPBearer(auto_error=False, description="An API token: `pgf_...`")


async def get_platform(request: Request) -> Platform:  # no I/O: no thread hop
    platform: Platform = request.app.state.platform
    return platform


PlatformDep = Annotated[Platform, Depends(get_platform)]


def get_owner(
    platform: PlatformDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Owner:
    return authenticate(platform, creds.credentials if creds else None)


OwnerDep = Annotated[Owner, Depends(get_owner)]


def get_admin(owner: OwnerDep) -> Owner:
    if not owner.is_admin:
        raise Forbidden("this needs an admin token")
    return owner


AdminDep = Annotated[Owner, Depends(get_admin)]
