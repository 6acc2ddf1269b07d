"""The outbox for operators: list effects, inspect one's attempts, retry a dead one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request

from api.http.idempotency import IdempotentRoute
from api.http.problems import problem_responses
from api.http.read_models import ProjectionsDep
from api.http.schemas.reads import (
    EffectDetailPublic,
    EffectPublic,
    EffectsPublic,
    EffectStatus,
)
from projections.effects.service import (
    EffectNotDeadError,
    Effects,
    EffectView,
)

router = APIRouter(
    prefix="/effects",
    tags=["effects"],
    responses=problem_responses(422),
    route_class=IdempotentRoute,
)

MAX_PAGE = 1000

# Effect ids are UUIDs; anything else is invalid input rather than a lookup (PostgreSQL
# refuses a NUL in a text parameter).
EffectId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]


def get_effects(runtime: ProjectionsDep, request: Request) -> Effects:
    """Operations on the outbox of the app's read-model database."""
    return Effects(runtime.engine, runtime.source, request.app.state.settings.webhook_targets)


EffectsDep = Annotated[Effects, Depends(get_effects)]


def _public(view: EffectView) -> EffectPublic:
    return EffectPublic.model_validate(view, from_attributes=True)


def _detail(view: EffectView) -> EffectDetailPublic:
    return EffectDetailPublic.model_validate(view, from_attributes=True)


@router.get("")
def read_effects(
    effects: EffectsDep,
    status: Annotated[EffectStatus | None, Query(description="Only effects in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> EffectsPublic:
    """Effects in position order, optionally only pending, delivered or dead ones."""
    return EffectsPublic(data=[_public(v) for v in effects.find(status=status, limit=limit)])


@router.get("/{effect_id}", responses=problem_responses(404))
def read_effect(effect_id: EffectId, effects: EffectsDep) -> EffectDetailPublic:
    """One effect with the time, outcome, status code and error of every attempt."""
    return _detail(effects.get(effect_id))


@router.post("/{effect_id}/retry", responses=problem_responses(404, 409))
def retry_effect(effect_id: EffectId, effects: EffectsDep) -> EffectDetailPublic:
    """Send a dead effect again with a fresh set of attempts; its history is kept."""
    try:
        return _detail(effects.retry(effect_id))
    except EffectNotDeadError as error:
        raise HTTPException(409, detail=str(error)) from None
