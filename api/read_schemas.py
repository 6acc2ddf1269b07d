"""Response models of the read side: read models, projection status and rebuilds."""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, Field

from api.schemas import LineOut


class OrderSummaryPublic(BaseModel):
    """An order as the order_summaries read model shows it."""

    order_id: str
    status: Literal[
        "pending_payment", "partially_paid", "paid", "shipped", "delivered", "cancelled"
    ]
    customer_id: str
    currency: str
    line_count: int
    lines: list[LineOut]
    total: int
    captured: int
    refunded: int
    refund_due: int
    balance_due: int
    placed_at: datetime
    updated_at: datetime
    version: int
    last_position: int = Field(description="Global position of the order's newest event.")


class OrderSummariesPublic(BaseModel):
    """One page of orders, newest first."""

    data: list[OrderSummaryPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")
    next: str | None = Field(description="Link to the next page, if there is one.")


class ProjectionErrorPublic(BaseModel):
    """Why a projection (or a rebuild) stopped, and where."""

    position: int
    event_id: str | None
    event_type: str | None
    message: str | None
    at: datetime | None


class RebuildPublic(BaseModel):
    """A new generation being built from event zero while the current one serves."""

    generation: int
    version: int
    position: int
    head: int
    fraction: float
    started_at: datetime
    failed: bool
    error: ProjectionErrorPublic | None


class ProjectionPublic(BaseModel):
    """One projection's progress and health."""

    name: str
    version: int
    serving_generation: int | None
    serving_version: int | None
    position: int
    head: int
    lag_events: int
    lag_seconds: float
    state: Literal["live", "catching_up", "rebuilding", "failed", "stalled", "not_started"]
    last_error: ProjectionErrorPublic | None
    lease_owner: str | None
    updated_at: datetime | None
    rebuild: RebuildPublic | None


class ProjectionsPublic(BaseModel):
    data: list[ProjectionPublic]


class RebuildAccepted(BaseModel):
    """A rebuild was started (or one in progress was found)."""

    name: str
    generation: int
    status_url: str


class DaySalesPublic(BaseModel):
    day: date
    currency: str
    orders_placed: int
    gross: int
    captured: int
    refunded: int
    net: int
    cancellations: int
