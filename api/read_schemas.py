"""Response models of the read side (read models, projection status, rebuilds), and its inputs."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from api.schemas import LineOut
from domain.errors import InvalidCommandError
from domain.order import MAX_ID_LENGTH, bounded_text


def _identifier(value: str) -> str:
    try:
        return bounded_text(value, name="identifier", max_length=MAX_ID_LENGTH)
    except InvalidCommandError as error:
        raise ValueError(str(error)) from None


# No store can hold an id the domain refuses (and PostgreSQL refuses NUL in any text),
# so such an id in a path or query is invalid input rather than a lookup.
IdentifierParam = Annotated[str, AfterValidator(_identifier)]


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
    """One day's sales in one currency, in minor units; net is captured minus refunded."""

    day: date
    currency: str
    orders_placed: int
    gross: int
    captured: int
    refunded: int
    net: int
    cancellations: int


class DailySalesPublic(BaseModel):
    """Sales per day and currency over a range of days, oldest first."""

    data: list[DaySalesPublic]


class CustomerSpendPublic(BaseModel):
    """What a customer paid in one currency, in minor units."""

    currency: str
    captured: int
    refunded: int
    net: int = Field(description="Captured minus refunded.")


class CustomerStatsPublic(BaseModel):
    """A customer's orders and spend as the customer_stats read model shows them."""

    customer_id: str
    orders: int
    first_order_at: datetime
    last_order_at: datetime
    spend: list[CustomerSpendPublic] = Field(description="One entry per currency ordered in.")


class SkuSalesPublic(BaseModel):
    """One SKU's sales in one currency; revenue in minor units, net of cancellations."""

    sku: str
    currency: str
    units_ordered: int
    units_cancelled: int
    net_units: int = Field(description="Units ordered minus units cancelled.")
    revenue: int


class TopSkusPublic(BaseModel):
    """The best-selling SKUs by net units, most first."""

    data: list[SkuSalesPublic]


# -- side effects ---------------------------------------------------------------------------


class WebhookCreate(BaseModel):
    """A URL to POST events to, and the event types it wants (``*`` for every type)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"url": "https://example.com/hooks", "event_types": ["OrderPlaced", "OrderShipped"]}
            ]
        },
    )

    url: str = Field(min_length=1, max_length=2048, examples=["https://example.com/hooks"])
    event_types: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=lambda: ["*"], max_length=32, examples=[["OrderPlaced", "OrderShipped"]]
    )


class WebhookPublic(BaseModel):
    """A webhook subscription; its signing secret is never shown again after creation."""

    id: str
    url: str
    event_types: list[str]
    active: bool
    created_at: datetime


class WebhookCreated(WebhookPublic):
    """A new subscription, with its signing secret: shown this once, store it now."""

    secret: str = Field(description="Standard Webhooks signing secret (whsec_...).")


class WebhooksPublic(BaseModel):
    data: list[WebhookPublic]


EffectStatus = Literal["pending", "delivered", "dead"]


class EffectPublic(BaseModel):
    """One side effect in the outbox: a webhook delivery or a customer email."""

    id: str = Field(description="Stable across retries; receivers use it to drop duplicates.")
    effect: str
    kind: Literal["webhook", "email"]
    order_id: str
    position: int = Field(description="Global position of the event that triggered it.")
    event_type: str
    target: str
    status: EffectStatus
    attempts: int = Field(description="Attempts since it was recorded or last retried.")
    total_attempts: int
    next_attempt_at: datetime
    created_at: datetime
    delivered_at: datetime | None
    last_error: str | None


class EffectsPublic(BaseModel):
    """Effects in position order."""

    data: list[EffectPublic]


class AttemptPublic(BaseModel):
    """One delivery attempt."""

    attempt: int
    started_at: datetime
    duration_ms: float
    outcome: Literal["delivered", "failed", "dead"]
    status_code: int | None
    error: str | None


class EffectDetailPublic(EffectPublic):
    """An effect with every attempt made at it."""

    history: list[AttemptPublic]


class ReadinessCheck(BaseModel):
    status: Literal["ok", "failing"]
    detail: str


class Readiness(BaseModel):
    """Whether this instance should get traffic, and each check behind the answer."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, ReadinessCheck]
