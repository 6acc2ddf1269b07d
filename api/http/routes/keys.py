"""API keys over HTTP (admin only): issue one (its token is shown once), list them, revoke one."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from api.http.auth import KeyStoreDep
from api.http.idempotency import IdempotentRoute, replay_instead
from api.http.problems import problem_response, problem_responses
from api.key_store import MAX_NAME_LENGTH, ApiKey, Role

router = APIRouter(prefix="/keys", tags=["keys"], route_class=IdempotentRoute)

KeyId = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$", description="The key's id (16 hex digits).")]


class KeyCreate(BaseModel):
    """Issue a key with a role."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"role": "reader", "name": "dashboard"}]}
    )

    role: Role
    name: Annotated[StrictStr, Field(max_length=MAX_NAME_LENGTH)] = ""


class KeyPublic(BaseModel):
    """A key as stored: never its token."""

    key_id: str
    name: str
    role: Role
    active: bool
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None = Field(
        description="Refreshed at most every ten minutes, not on every request."
    )


class KeyIssued(KeyPublic):
    """A new key: its token is in this response and nowhere else."""

    token: str = Field(description="Send as 'Authorization: Bearer <token>'. Shown only once.")


class KeysPublic(BaseModel):
    data: list[KeyPublic]


def _public(key: ApiKey) -> KeyPublic:
    return KeyPublic.model_validate(key, from_attributes=True)


@router.post("", status_code=201, responses=problem_responses(409, 422))
def create_key(body: KeyCreate, keys: KeyStoreDep, request: Request) -> KeyIssued:
    """Issue a key; store its token now, it cannot be shown again.

    With an Idempotency-Key, a retry issues no second key: since the token is never stored,
    the retry gets a 409 problem naming the key that was issued.
    """
    issued = keys.create(body.role, body.name)
    replay_instead(
        request,
        problem_response(
            request,
            status=409,
            slug="key-already-issued",
            title="Key already issued",
            detail=f"this Idempotency-Key already issued key {issued.key_id}; its token was "
            "shown once and is not stored: if it was lost, revoke the key and issue another",
        ),
    )
    return KeyIssued(
        **_public(keys.get(issued.key_id)).model_dump(),
        token=issued.token,
    )


@router.get("")
def read_keys(keys: KeyStoreDep) -> KeysPublic:
    """Every key, active and revoked, oldest first."""
    return KeysPublic(data=[_public(key) for key in keys.list()])


@router.delete("/{key_id}", status_code=204, responses=problem_responses(404, 422))
def revoke_key(key_id: KeyId, keys: KeyStoreDep) -> Response:
    """Revoke a key: every API process refuses it within about a second."""
    keys.revoke(key_id)
    return Response(status_code=204)
