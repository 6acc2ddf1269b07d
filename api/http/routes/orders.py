"""Order commands and the audit reads of one order."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.http.dependencies import (
    JSON_BODY,
    CommandOptionsDep,
    IdempotencyKeyDep,
    LedgerDep,
    recorded_context,
)
from api.http.problems import problem_responses, response_headers
from api.http.read_models import in_read_thread
from api.http.schemas.commands import (
    CancellationCreate,
    CommandAccepted,
    DeliveryCreate,
    HistoryEvent,
    LineCreate,
    OrderCreate,
    OrderHistory,
    OrderState,
    PaymentCreate,
    RefundCreate,
    ShipmentCreate,
)
from domain.ledger import CommandResult, OrderLedger
from domain.money import MAX_AMOUNT
from domain.order import MAX_ID_LENGTH

router = APIRouter(
    prefix="/orders",
    tags=["orders"],
    dependencies=[JSON_BODY, Depends(recorded_context)],
    responses=problem_responses(404, 422),
)

# What a client (or a fuzzer following links) can do next with the order_id it got back.
_NEXT_OPERATIONS = (
    "add_line",
    "remove_line",
    "capture_payment",
    "ship_order",
    "deliver_order",
    "cancel_order",
    "issue_refund",
    "read_order_state",
    "read_order_history",
)
_ORDER_LINKS = {
    "links": {
        name: {"operationId": name, "parameters": {"order_id": "$response.body#/order_id"}}
        for name in _NEXT_OPERATIONS
    }
}
_COMMAND_PROBLEMS = problem_responses(409, 412, 413, 415, 503)
_COMMAND_RESPONSES = {
    **_COMMAND_PROBLEMS,
    200: response_headers("ETag", "Orderledger-Position", "Idempotent-Replayed") | _ORDER_LINKS,
}
_PLACEMENT_RESPONSES = {
    **_COMMAND_PROBLEMS,
    201: response_headers("Location", "ETag", "Orderledger-Position", "Idempotent-Replayed")
    | _ORDER_LINKS,
}

Sku = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH)]


def accepted_headers(result: CommandResult) -> dict[str, str]:
    """A recorded command's version and position as headers."""
    headers = {"ETag": f'"{result.version}"', "Orderledger-Position": str(result.position)}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    return headers


def placement_headers(result: CommandResult) -> dict[str, str]:
    """A placed order's headers: where it is, and its version and position."""
    return {"Location": f"{router.prefix}/{result.order_id}", **accepted_headers(result)}


def accepted(result: CommandResult) -> CommandAccepted:
    return CommandAccepted(
        order_id=result.order_id, version=result.version, position=result.position
    )


def _accepted(response: Response, result: CommandResult) -> CommandAccepted:
    """The command's outcome, with its version and position also as headers."""
    response.headers.update(accepted_headers(result))
    return accepted(result)


@router.post("", status_code=201, responses=_PLACEMENT_RESPONSES)
async def create_order(
    body: OrderCreate,
    ledger: LedgerDep,
    response: Response,
    idempotency_key: IdempotencyKeyDep,
) -> CommandAccepted:
    """Place a new order."""
    result = await run_in_threadpool(
        ledger.place_order, **body.model_dump(), idempotency_key=idempotency_key
    )
    response.headers.update(placement_headers(result))
    return accepted(result)


@router.post("/{order_id}/lines", responses=_COMMAND_RESPONSES)
async def add_line(
    order_id: UUID,
    body: LineCreate,
    ledger: LedgerDep,
    options: CommandOptionsDep,
    response: Response,
) -> CommandAccepted:
    """Add a line to an order that has no payment yet."""
    result = await run_in_threadpool(
        ledger.add_line, order_id, **body.model_dump(), **options.as_kwargs()
    )
    return _accepted(response, result)


@router.delete("/{order_id}/lines/{sku}", responses=_COMMAND_RESPONSES)
async def remove_line(
    order_id: UUID, sku: Sku, ledger: LedgerDep, options: CommandOptionsDep, response: Response
) -> CommandAccepted:
    """Remove a line from an order that has no payment yet."""
    result = await run_in_threadpool(ledger.remove_line, order_id, sku=sku, **options.as_kwargs())
    return _accepted(response, result)


@router.post("/{order_id}/payments", responses=_COMMAND_RESPONSES)
async def capture_payment(
    order_id: UUID,
    body: PaymentCreate,
    ledger: LedgerDep,
    options: CommandOptionsDep,
    response: Response,
) -> CommandAccepted:
    """Capture part or all of the order's outstanding balance."""
    result = await run_in_threadpool(
        ledger.capture_payment, order_id, **body.model_dump(), **options.as_kwargs()
    )
    return _accepted(response, result)


@router.post("/{order_id}/shipment", responses=_COMMAND_RESPONSES)
async def ship_order(
    order_id: UUID,
    body: ShipmentCreate,
    ledger: LedgerDep,
    options: CommandOptionsDep,
    response: Response,
) -> CommandAccepted:
    """Hand a fully paid order to a carrier."""
    result = await run_in_threadpool(
        ledger.ship_order, order_id, **body.model_dump(), **options.as_kwargs()
    )
    return _accepted(response, result)


@router.post("/{order_id}/delivery", responses=_COMMAND_RESPONSES)
async def deliver_order(
    order_id: UUID,
    ledger: LedgerDep,
    options: CommandOptionsDep,
    response: Response,
    body: Annotated[DeliveryCreate | None, Body()] = None,
) -> CommandAccepted:
    """Record that a shipped order reached the customer."""
    # The body is optional and empty; declaring it makes a body with unknown fields a 422.
    result = await run_in_threadpool(ledger.deliver_order, order_id, **options.as_kwargs())
    return _accepted(response, result)


@router.post("/{order_id}/cancellation", responses=_COMMAND_RESPONSES)
async def cancel_order(
    order_id: UUID,
    body: CancellationCreate,
    ledger: LedgerDep,
    options: CommandOptionsDep,
    response: Response,
) -> CommandAccepted:
    """Cancel an order that has not shipped."""
    result = await run_in_threadpool(
        ledger.cancel_order, order_id, **body.model_dump(), **options.as_kwargs()
    )
    return _accepted(response, result)


@router.post("/{order_id}/refunds", responses=_COMMAND_RESPONSES)
async def issue_refund(
    order_id: UUID,
    body: RefundCreate,
    ledger: LedgerDep,
    options: CommandOptionsDep,
    response: Response,
) -> CommandAccepted:
    """Give back money captured on the order and not yet refunded."""
    result = await run_in_threadpool(
        ledger.issue_refund, order_id, **body.model_dump(), **options.as_kwargs()
    )
    return _accepted(response, result)


# The audit reads of one order: the same place, roles and body check, without the command context.
history_router = APIRouter(
    prefix=router.prefix,
    tags=["orders"],
    dependencies=[JSON_BODY],
    responses=problem_responses(404, 422),
)


@history_router.get("/{order_id}/history")
async def read_order_history(order_id: UUID, ledger: LedgerDep, request: Request) -> OrderHistory:
    """Every event of the order, oldest first, with its global position."""
    return await in_read_thread(request, order_history, ledger, order_id)


def order_history(ledger: OrderLedger, order_id: UUID) -> OrderHistory:
    """GET /orders/{id}/history's answer, read from the store."""
    entries = ledger.order_history(order_id)
    events = [HistoryEvent.model_validate(entry, from_attributes=True) for entry in entries]
    return OrderHistory(order_id=order_id, events=events)


@history_router.get("/{order_id}/state")
async def read_order_state(
    order_id: UUID,
    ledger: LedgerDep,
    request: Request,
    version: Annotated[int | None, Query(ge=1, le=MAX_AMOUNT)] = None,
    at: Annotated[
        datetime | None, Query(description="A moment with its timezone, e.g. 2026-01-31T12:00Z")
    ] = None,
) -> OrderState:
    """The order as it was at a version or a moment (give one, or neither for now)."""
    as_of = partial(ledger.order_as_of, version=version, at=at)
    order = await in_read_thread(request, as_of, order_id)
    return OrderState.model_validate(order.snapshot())
