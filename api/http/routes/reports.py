"""Sales reports from the daily_sales and sku_sales read models."""

from __future__ import annotations

from datetime import date
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError

from api.http.dependencies import ReachableMinPositionDep
from api.http.problems import problem_responses
from api.http.read_models import read_model
from api.http.schemas.reads import (
    DailySalesPublic,
    DaySalesPublic,
    IsoDay,
    SkuSalesPublic,
    TopSkusPublic,
)
from projections.daily_sales import daily_sales_between
from projections.sku_sales import top_skus

router = APIRouter(
    prefix="/reports",
    tags=["reports"],
    responses=problem_responses(422, 503),
)

MAX_DAYS = 366
MAX_SKUS = 100
Currency = Annotated[
    str | None, Query(pattern=r"^[A-Z]{3}$", description="ISO 4217 code.", examples=["EUR"])
]


def day_range(
    start: Annotated[IsoDay, Query(alias="from", description="First UTC day, inclusive.")],
    end: Annotated[IsoDay, Query(alias="to", description="Last UTC day, inclusive.")],
) -> tuple[date, date]:
    """The days asked for: from on or before to, at most MAX_DAYS of them."""
    reason = None
    if end < start:
        reason = f"to ({end}) is before from ({start})"
    elif (end - start).days + 1 > MAX_DAYS:
        reason = f"a report covers at most {MAX_DAYS} days, asked for {(end - start).days + 1}"
    if reason is not None:
        error = {"type": "value_error", "loc": ("query", "to"), "msg": reason, "input": str(end)}
        raise RequestValidationError([error])
    return start, end


@router.get("/daily-sales")
async def read_daily_sales(
    days: Annotated[tuple[date, date], Depends(day_range)],
    request: Request,
    min_position: ReachableMinPositionDep,
    currency: Currency = None,
) -> DailySalesPublic:
    """Orders placed, gross, captured, refunded, net and cancellations per UTC day and currency."""
    query = partial(daily_sales_between, start=days[0], end=days[1], currency=currency)
    rows = await read_model(request, "daily_sales", query, min_position)
    return DailySalesPublic(
        data=[DaySalesPublic.model_validate(r, from_attributes=True) for r in rows]
    )


@router.get("/top-skus")
async def read_top_skus(
    request: Request,
    min_position: ReachableMinPositionDep,
    limit: Annotated[int, Query(ge=1, le=MAX_SKUS)] = 10,
    currency: Currency = None,
) -> TopSkusPublic:
    """The SKUs with the most units ordered and not cancelled, most first (ties by SKU)."""
    query = partial(top_skus, limit=limit, currency=currency)
    rows = await read_model(request, "sku_sales", query, min_position)
    return TopSkusPublic(
        data=[SkuSalesPublic.model_validate(r, from_attributes=True) for r in rows]
    )
