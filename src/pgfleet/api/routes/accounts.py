"""Who you are, your tokens, and owners (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from pgfleet import auth
from pgfleet.api.deps import AdminDep, OwnerDep, PlatformDep
from pgfleet.api.idempotency import run_idempotent
from pgfleet.api.routes.common import (
    ERRORS,
    IdemHeader,
)
from pgfleet.api.schemas import (
    ErrorResponse,
    OwnerCreate,
    OwnerCreated,
    OwnerList,
    OwnerOut,
    OwnerRow,
    TokenCreate,
    TokenCreated,
    TokenList,
    TokenOut,
)

router = APIRouter()


@router.get("/me", tags=["auth"], summary="Who this token belongs to")
def me(owner: OwnerDep) -> OwnerOut:
    return OwnerOut(id=owner.id, name=owner.name, is_admin=owner.is_admin)


@router.post(
    "/tokens",
    tags=["auth"],
    status_code=201,
    summary="Create an API token",
    response_model=TokenCreated,
)
def create_token(
    body: TokenCreate, platform: PlatformDep, owner: OwnerDep, idempotency_key: IdemHeader = None
) -> JSONResponse:
    """A new token of yours, shown once. `scope: read` makes a token that
    lists, shows and runs read-only SQL only; `expires_in_days` one that
    stops working then (401 saying when). A read-only token cannot make
    tokens."""

    def produce() -> tuple[int, Any]:
        tid, token, expires_at = auth.create_token(
            platform, owner, body.name, scope=body.scope, expires_in_days=body.expires_in_days
        )
        return 201, TokenCreated(
            id=tid, name=body.name, scope=body.scope, expires_at=expires_at, token=token
        )

    return run_idempotent(
        platform,
        owner,
        idempotency_key,
        method="POST",
        path="/v1/tokens",
        body=body,
        produce=produce,
    )


@router.get("/tokens", tags=["auth"], summary="Your API tokens (never the secrets)")
def list_tokens(platform: PlatformDep, owner: OwnerDep) -> TokenList:
    return TokenList(tokens=[TokenOut(**r) for r in auth.list_tokens(platform, owner)])


@router.delete(
    "/tokens/{token_id}",
    tags=["auth"],
    status_code=204,
    summary="Revoke a token",
    responses={404: ERRORS[404]},
)
def revoke_token(token_id: str, platform: PlatformDep, owner: OwnerDep) -> Response:
    auth.revoke_token(platform, owner, token_id)
    return Response(status_code=204)


@router.post(
    "/admin/owners",
    tags=["admin"],
    status_code=201,
    summary="Create an owner",
    response_model=OwnerCreated,
    responses={
        409: {"model": ErrorResponse, "description": "Another owner has that name already."}
    },
)
def create_owner(
    body: OwnerCreate, platform: PlatformDep, admin: AdminDep, idempotency_key: IdemHeader = None
) -> JSONResponse:
    """Creates an owner (a person or team) and its first token, shown once."""

    def produce() -> tuple[int, Any]:
        owner, token = auth.create_owner(platform, body.name, is_admin=body.is_admin, unique=True)
        return 201, OwnerCreated(
            owner=OwnerOut(id=owner.id, name=owner.name, is_admin=owner.is_admin), token=token
        )

    return run_idempotent(
        platform,
        admin,
        idempotency_key,
        method="POST",
        path="/v1/admin/owners",
        body=body,
        produce=produce,
    )


@router.get("/admin/owners", tags=["admin"], summary="All owners")
def list_owners(platform: PlatformDep, admin: AdminDep) -> OwnerList:
    return OwnerList(owners=[OwnerRow(**r) for r in auth.list_owners(platform)])


@router.get(
    "/admin/owners/{owner_id}/tokens",
    tags=["admin"],
    summary="An owner's API tokens (never the secrets)",
    responses={404: ERRORS[404]},
)
def list_owner_tokens(owner_id: str, platform: PlatformDep, admin: AdminDep) -> TokenList:
    return TokenList(
        tokens=[
            TokenOut(**r) for r in auth.list_tokens_of(platform, auth.owner_id(platform, owner_id))
        ]
    )


@router.delete(
    "/admin/tokens/{token_id}",
    tags=["admin"],
    status_code=204,
    summary="Revoke any owner's token",
    responses={404: ERRORS[404]},
)
def revoke_any_token(token_id: str, platform: PlatformDep, admin: AdminDep) -> Response:
    auth.revoke_any_token(platform, admin, token_id)
    return Response(status_code=204)
