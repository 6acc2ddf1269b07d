"""The customer_stats read model: one customer's orders and spend."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request

from api.http.dependencies import ReachableMinPositionDep
from api.http.problems import problem_responses
from api.http.read_models import read_model
from api.http.schemas.reads import CustomerStatsPublic, IdentifierParam
from projections.customer_stats import get_customer_stats

router = APIRouter(
    prefix="/customers",
    tags=["customers"],
    responses=problem_responses(404, 422, 503),
)


# A customer id may hold a slash, so the rest of the path is the id.
@router.get("/{customer_id:path}")
async def read_customer(
    customer_id: Annotated[IdentifierParam, Path()],
    request: Request,
    min_position: ReachableMinPositionDep,
) -> CustomerStatsPublic:
    """A customer's order count, first and last order, and spend per currency."""
    query = partial(get_customer_stats, customer_id=customer_id)
    stats = await read_model(request, "customer_stats", query, min_position)
    if stats is None:
        raise HTTPException(status_code=404, detail=f"customer {customer_id!r} has no orders")
    return CustomerStatsPublic.model_validate(stats, from_attributes=True)
