"""A customer's personal data: see all of it (right of access), or erase it (admins only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from api.http.dependencies import recorded_context
from api.http.idempotency import IdempotentRoute
from api.http.problems import problem_responses
from api.http.read_models import get_projections
from api.http.schemas.reads import ErasurePublic, IdentifierParam, PersonalDataPublic
from api.personal_data import export

router = APIRouter(
    prefix="/customers",
    tags=["customers"],
    responses=problem_responses(404, 422, 503),
    route_class=IdempotentRoute,
)

CustomerId = Annotated[IdentifierParam, Path()]


# A customer id may hold a slash: matched before /customers/{customer_id:path}.
@router.get("/{customer_id:path}/personal-data")
async def read_personal_data(customer_id: CustomerId, request: Request) -> PersonalDataPublic:
    """Everything held about the customer, decrypted, per order; ``[erased]`` once erased."""
    ledger = request.app.state.ledger
    found: dict[str, Any] = await run_in_threadpool(
        export, ledger, get_projections(request), customer_id
    )
    if not found["orders"] and not found["data_keys"]:
        raise HTTPException(404, detail=f"nothing is held about customer {customer_id!r}")
    return PersonalDataPublic.model_validate(found)


@router.delete("/{customer_id:path}/personal-data", dependencies=[Depends(recorded_context)])
async def erase_personal_data(
    customer_id: CustomerId,
    request: Request,
    reason: Annotated[
        str, Query(min_length=1, max_length=500, description="Why: recorded with the erasure.")
    ],
) -> ErasurePublic:
    """Erase the customer's personal data: delete their data keys, record who asked and why.

    Events, totals and hash chains stay; every personal value of the customer reads as
    ``[erased]`` in every process within ORDERLEDGER_PERSONAL_KEY_CACHE_TTL seconds.
    """
    ledger = request.app.state.ledger
    result = await run_in_threadpool(ledger.erase_customer, customer_id, reason=reason)
    return ErasurePublic(
        customer_id=result.customer_id, position=result.position, keys_erased=result.keys_erased
    )
