"""The orders read model (order_summaries): one order, and filtered keyset-paginated lists."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, time, timedelta
from functools import partial
from typing import Annotated, Any, Literal, get_args
from uuid import UUID

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from pydantic import AfterValidator
from pydantic_core import to_json
from sqlalchemy import Connection, Table

from api.http.dependencies import ReachableMinPositionDep
from api.http.problems import problem_responses, response_headers
from api.http.read_models import order_reader, point_read, read_model
from api.http.schemas.reads import IdentifierParam, IsoDay, OrderSummariesPublic, OrderSummaryPublic
from projections.order_summaries import (
    InvalidCursorError,
    OrderSummary,
    OrderSummaryPage,
    aware,
    decode_cursor,
    lines_from,
    list_order_summaries,
)

router = APIRouter(
    prefix="/orders",
    tags=["orders"],
    responses=problem_responses(404, 422, 503),
)

MAX_PAGE = 200
Status = Literal["pending_payment", "partially_paid", "paid", "shipped", "delivered", "cancelled"]
STATUSES: tuple[str, ...] = get_args(Status)


def public(summary: OrderSummary) -> OrderSummaryPublic:
    return OrderSummaryPublic.model_validate(summary, from_attributes=True)


_PUBLIC_FIELDS = tuple(OrderSummaryPublic.model_fields)


def public_json(values: Mapping[str, Any]) -> bytes:
    """``public(summary_from(values)).model_dump_json()``, from the row as it is: the same bytes
    (pydantic-core writes both), without building a summary and a model to write it."""
    document = {name: values[name] for name in _PUBLIC_FIELDS}
    document["lines"] = lines_from(values["lines"])
    document["placed_at"] = aware(values["placed_at"])
    document["updated_at"] = aware(values["updated_at"])
    return to_json(document)


def etag_of(version: int) -> str:
    """The entity tag of an order at this version: the version, quoted."""
    return f'"{version}"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names this entity tag."""
    return if_none_match is not None and etag in [t.strip() for t in if_none_match.split(",")]


def _start_of(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def _issued_cursor(cursor: str) -> str:
    """Refuse a cursor holding no order id before it reaches the database.

    PostgreSQL fails on a NUL in a text parameter rather than matching nothing.
    """
    try:
        UUID(decode_cursor(cursor)[1])
    except ValueError:
        raise ValueError("cursor is malformed; use the one a previous page returned") from None
    return cursor


def _end_of(day: date) -> datetime | None:
    """The moment after the day, or None for the last day a date can name."""
    return None if day == date.max else _start_of(day + timedelta(days=1))


def order_listing(
    customer_id: str | None,
    status: str | None,
    placed_from: date | None,
    placed_to: date | None,
    limit: int,
    cursor: str | None,
) -> Callable[[Connection, dict[str, Table]], OrderSummaryPage]:
    """The order_summaries query for a page of orders placed within the days (UTC, inclusive)."""
    return partial(
        list_order_summaries,
        customer_id=customer_id,
        status=status,
        placed_from=_start_of(placed_from) if placed_from else None,
        placed_to=_end_of(placed_to) if placed_to else None,
        limit=limit,
        cursor=cursor,
    )


@router.get("")
async def list_orders(
    request: Request,
    min_position: ReachableMinPositionDep,
    customer_id: Annotated[IdentifierParam | None, Query()] = None,
    status: Status | None = None,
    placed_from: Annotated[IsoDay | None, Query(description="First day, inclusive (UTC).")] = None,
    placed_to: Annotated[IsoDay | None, Query(description="Last day, inclusive (UTC).")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=512), AfterValidator(_issued_cursor)] = None,
) -> OrderSummariesPublic:
    """Orders newest first, by customer, status and placed-date range, one page at a time."""
    query = order_listing(customer_id, status, placed_from, placed_to, limit, cursor)
    try:
        page = await read_model(request, "order_summaries", query, min_position)
    except InvalidCursorError as error:
        raise HTTPException(status_code=422, detail=str(error)) from None
    next_link = None
    if page.next_cursor is not None:
        next_link = str(request.url.include_query_params(cursor=page.next_cursor))
    return OrderSummariesPublic(
        data=[public(s) for s in page.items], next_cursor=page.next_cursor, next=next_link
    )


@router.get(
    "/{order_id}",
    response_model=OrderSummaryPublic,
    responses={
        200: response_headers("ETag"),
        304: {"description": "Not modified: If-None-Match names the current version"}
        | response_headers("ETag"),
    },
)
async def read_order(
    order_id: UUID,
    request: Request,
    min_position: ReachableMinPositionDep,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    """The order from the read model (its full audit is at /orders/{id}/history)."""
    row = await point_read(request, order_reader(request), str(order_id), min_position)
    if row is None:
        raise HTTPException(status_code=404, detail=f"order {order_id} not found")
    etag = etag_of(row["version"])
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    return Response(public_json(row), media_type="application/json", headers={"ETag": etag})
