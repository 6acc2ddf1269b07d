"""Response models of the read side (read models, projection status, rebuilds), and its inputs."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, JsonValue

from api.http.schemas.commands import ActorOut, LineOut
from domain.errors import InvalidCommandError
from domain.order import MAX_ID_LENGTH, bounded_text


def _identifier(value: str) -> str:
    try:
        return bounded_text(value, name="identifier", max_length=MAX_ID_LENGTH)
    except InvalidCommandError as error:
        raise ValueError(str(error)) from None


def _iso_day(value: object) -> object:
    """Only YYYY-MM-DD names a day: "0" or "1700000000" would otherwise parse as timestamps."""
    if isinstance(value, str) and not _ISO_DAY.fullmatch(value):
        raise ValueError("a day is written YYYY-MM-DD, e.g. 2026-01-31")
    return value


_ISO_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
IsoDay = Annotated[date, BeforeValidator(_iso_day)]
"""A calendar day as a query parameter, in ISO 8601 form only."""

# No store can hold an id the domain refuses (and PostgreSQL refuses NUL in any text),
# so such an id in a path or query is invalid input rather than a lookup.
IdentifierParam = Annotated[str, AfterValidator(_identifier)]


_ORDER_ID = "0d9b1f5e-3c1a-4f55-9a7e-2b8f6f3f8a10"
_AT = "2026-01-31T12:05:00Z"
_CURSOR = "MjAyNi0wMS0zMVQxMjowMDowMFp8MGQ5YjFmNWU"
_SUMMARY_EXAMPLE: dict[str, JsonValue] = {
    "order_id": _ORDER_ID,
    "status": "paid",
    "customer_id": "cust-42",
    "currency": "EUR",
    "line_count": 1,
    "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": 1250}],
    "total": 2500,
    "captured": 2500,
    "refunded": 0,
    "refund_due": 0,
    "balance_due": 0,
    "placed_at": "2026-01-31T12:00:00Z",
    "updated_at": _AT,
    "version": 2,
    "last_position": 1041,
}
_PROJECTION_EXAMPLE: dict[str, JsonValue] = {
    "name": "order_summaries",
    "version": 1,
    "serving_generation": 1,
    "serving_version": 1,
    "position": 1041,
    "head": 1041,
    "lag_events": 0,
    "lag_seconds": 0.0,
    "state": "live",
    "last_error": None,
    "lease_owner": "worker-1",
    "updated_at": _AT,
    "rebuild": None,
    "pending_drops": [],
    "refused": None,
    "oldest_transaction_seconds": 0.012,
}
_DAY_EXAMPLE: dict[str, JsonValue] = {
    "day": "2026-01-31",
    "currency": "EUR",
    "orders_placed": 3,
    "gross": 7500,
    "captured": 5000,
    "refunded": 1250,
    "net": 3750,
    "cancellations": 1,
}
_CUSTOMER_EXAMPLE: dict[str, JsonValue] = {
    "customer_id": "cust-42",
    "orders": 3,
    "first_order_at": "2026-01-02T09:30:00Z",
    "last_order_at": _AT,
    "spend": [{"currency": "EUR", "captured": 5000, "refunded": 1250, "net": 3750}],
}
_SKU_EXAMPLE: dict[str, JsonValue] = {
    "sku": "SKU-1",
    "currency": "EUR",
    "units_ordered": 12,
    "units_cancelled": 2,
    "net_units": 10,
    "revenue": 12500,
}
_WEBHOOK_EXAMPLE: dict[str, JsonValue] = {
    "id": "5f0c9d6e-8a4b-4c1d-9e2f-3a7b6c5d4e3f",
    "url": "https://example.com/hooks",
    "event_types": ["OrderPlaced", "OrderShipped"],
    "active": True,
    "created_at": _AT,
}
_EFFECT_EXAMPLE: dict[str, JsonValue] = {
    "id": "99602fdb-39c5-513b-b5c8-4a02d4685120",
    "effect": "webhook:5f0c9d6e-8a4b-4c1d-9e2f-3a7b6c5d4e3f",
    "kind": "webhook",
    "order_id": _ORDER_ID,
    "position": 1041,
    "event_type": "PaymentCaptured",
    "target": "https://example.com/hooks",
    "status": "dead",
    "attempts": 8,
    "total_attempts": 8,
    "next_attempt_at": _AT,
    "created_at": _AT,
    "delivered_at": None,
    "last_error": "HTTP 500 from the receiver",
}
_ATTEMPT_EXAMPLE: dict[str, JsonValue] = {
    "attempt": 8,
    "started_at": _AT,
    "duration_ms": 41.7,
    "outcome": "dead",
    "status_code": 500,
    "error": "HTTP 500 from the receiver",
}
_READINESS_EXAMPLE: dict[str, JsonValue] = {"status": "ready"}


class OrderSummaryPublic(BaseModel):
    """An order as the order_summaries read model shows it."""

    model_config = ConfigDict(json_schema_extra={"examples": [_SUMMARY_EXAMPLE]})

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

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "data": [_SUMMARY_EXAMPLE],
                    "next_cursor": _CURSOR,
                    "next": "/orders?limit=1&cursor=" + _CURSOR,
                }
            ]
        }
    )

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

    model_config = ConfigDict(json_schema_extra={"examples": [_PROJECTION_EXAMPLE]})

    name: str
    version: int
    serving_generation: int | None
    serving_version: int | None
    position: int
    head: int
    lag_events: int
    lag_seconds: float
    state: Literal[
        "live", "catching_up", "rebuilding", "failed", "stalled", "not_started", "refused"
    ]
    last_error: ProjectionErrorPublic | None
    lease_owner: str | None
    updated_at: datetime | None
    rebuild: RebuildPublic | None
    pending_drops: list[int]
    """Retired generations whose tables a reader still holds; dropped on a later pass."""
    refused: str | None
    """Why this version of the code leaves the projection alone (the store holds a newer one)."""
    oldest_transaction_seconds: float
    """Age of the oldest transaction still running in the database cluster (PostgreSQL; 0 on
    SQLite): events recorded after it began wait until it ends."""


class ProjectionsPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [_PROJECTION_EXAMPLE]}]})
    data: list[ProjectionPublic]


class RebuildAccepted(BaseModel):
    """A rebuild was started (or one in progress was found)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "order_summaries",
                    "generation": 2,
                    "status_url": "/projections/order_summaries",
                }
            ]
        }
    )

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

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [_DAY_EXAMPLE]}]})

    data: list[DaySalesPublic]


class CustomerSpendPublic(BaseModel):
    """What a customer paid in one currency, in minor units."""

    currency: str
    captured: int
    refunded: int
    net: int = Field(description="Captured minus refunded.")


class CustomerStatsPublic(BaseModel):
    """A customer's orders and spend as the customer_stats read model shows them."""

    model_config = ConfigDict(json_schema_extra={"examples": [_CUSTOMER_EXAMPLE]})

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

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [_SKU_EXAMPLE]}]})

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


def _from_epoch(value: object) -> object:
    """Epoch seconds, as the outbox stores its times, as an aware UTC datetime."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    return value


EpochTime = Annotated[datetime, BeforeValidator(_from_epoch)]
"""A moment, built from the epoch seconds the outbox keeps."""


class WebhookPublic(BaseModel):
    """A webhook subscription; its signing secret is never shown again after creation."""

    id: str
    url: str
    event_types: list[str]
    active: bool
    created_at: EpochTime


class WebhookCreated(WebhookPublic):
    """A new subscription, with its signing secret: shown this once, store it now."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{**_WEBHOOK_EXAMPLE, "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}]
        }
    )

    secret: str = Field(description="Standard Webhooks signing secret (whsec_...).")


class WebhooksPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [_WEBHOOK_EXAMPLE]}]})
    data: list[WebhookPublic]


EffectStatus = Literal["pending", "delivered", "dead", "cancelled"]


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
    next_attempt_at: EpochTime
    created_at: EpochTime
    delivered_at: EpochTime | None
    last_error: str | None


class EffectsPublic(BaseModel):
    """Effects in position order."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [_EFFECT_EXAMPLE]}]})

    data: list[EffectPublic]


class AttemptPublic(BaseModel):
    """One delivery attempt."""

    attempt: int
    started_at: EpochTime
    duration_ms: float
    outcome: Literal["delivered", "failed", "dead", "cancelled"]
    status_code: int | None
    error: str | None


class EffectDetailPublic(EffectPublic):
    """An effect with every attempt made at it."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{**_EFFECT_EXAMPLE, "history": [_ATTEMPT_EXAMPLE]}]}
    )

    history: list[AttemptPublic]


class Readiness(BaseModel):
    """Whether this process can serve: its databases answer."""

    model_config = ConfigDict(json_schema_extra={"examples": [_READINESS_EXAMPLE]})

    status: Literal["ready", "not_ready"]


_HASH = "5c0f5e4d1f1c2b7e9a8d6c4b3a29180716253443526170819a0b1c2d3e4f5a6b"
_AUDIT_ENTRY_EXAMPLE: dict[str, JsonValue] = {
    "position": 4211,
    "order_id": _ORDER_ID,
    "version": 3,
    "event_type": "PaymentCaptured",
    "recorded_at": _AT,
    "event_id": "6f1d8c1e-0a51-4d8e-9a43-3f3e3c1a2b7d",
    "actor": {"kind": "key", "id": "3f9a1c2b4d5e6f70", "name": "checkout", "role": "writer"},
    "request_id": "req-7c1e",
    "correlation_id": "cart-5521",
    "causation_id": "0c7e2a4b-9f1d-4c55-8a3e-6b2d1f0e9c8a",
    "chain_hash": _HASH,
}
_CHECKPOINT_EXAMPLE: dict[str, JsonValue] = {
    "algorithm": "sha256-chain-v1",
    "position": 40000,
    "events": 39987,
    "digest": _HASH,
    "created_at": _AT,
    "reason": "interval",
    "tx": 0,
}


class AuditEntryPublic(BaseModel):
    """One event in the audit log: where it is, what it was, who recorded it and why."""

    model_config = ConfigDict(json_schema_extra={"examples": [_AUDIT_ENTRY_EXAMPLE]})

    position: int
    order_id: str = Field(
        description="The aggregate: an order, or a key an earlier version stored as an event."
    )
    version: int
    event_type: str = Field(examples=["PaymentCaptured"])
    recorded_at: datetime
    event_id: str
    actor: ActorOut
    request_id: str
    correlation_id: str
    causation_id: str
    chain_hash: str | None = Field(
        description="The event's link in its order's hash chain (hex); null before chaining."
    )


class AuditEntriesPublic(BaseModel):
    """One page of the audit log."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"data": [_AUDIT_ENTRY_EXAMPLE], "next_cursor": "YTQyMTE", "next": None}]
        }
    )

    data: list[AuditEntryPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")
    next: str | None = Field(description="Link to the next page, if there is one.")


class CheckpointPublic(BaseModel):
    """The digest of every chained event up to a position: keep it outside the store, and
    give it back to verify."""

    model_config = ConfigDict(json_schema_extra={"examples": [_CHECKPOINT_EXAMPLE]})

    algorithm: str = Field(examples=["sha256-chain-v1"])
    position: int
    events: int = Field(description="How many chained events the digest covers.")
    digest: str = Field(description="SHA-256, hex.")
    created_at: datetime
    reason: str = Field(examples=["interval", "requested"])
    tx: int = Field(
        0,
        ge=0,
        le=2**63 - 1,
        description="With position, where the checkpoint sits in the store's read order: the "
        "transaction id of its last event on PostgreSQL, 0 on SQLite and for checkpoints "
        "taken before transaction ids were recorded.",
    )


class CheckpointsPublic(BaseModel):
    """Every checkpoint recorded, oldest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [_CHECKPOINT_EXAMPLE]}]})

    data: list[CheckpointPublic]


class VerifyRequest(BaseModel):
    """What to verify: one order, or the whole store against the given checkpoints too."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"checkpoints": [_CHECKPOINT_EXAMPLE]}, {"order_id": _ORDER_ID}]
        },
    )

    order_id: UUID | None = Field(default=None, description="Verify this order only.")
    checkpoints: list[CheckpointPublic] = Field(
        default_factory=list,
        max_length=10_000,
        description="Checkpoints kept outside the store (as GET /audit/checkpoints gave them).",
    )


class VerifyProblemPublic(BaseModel):
    """The first broken link."""

    kind: str = Field(examples=["altered", "missing_from_store", "checkpoint_mismatch"])
    detail: str
    position: int | None
    order_id: str | None
    version: int | None


class VerifyReportPublic(BaseModel):
    """What verify checked, and the first broken link it found (``ok`` false)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "ok": False,
                    "order_id": None,
                    "head": 52034,
                    "events_checked": 4211,
                    "aggregates_checked": 1290,
                    "chained_events": 4211,
                    "chain_starts_at": 1,
                    "unchained_events": 0,
                    "audit_log_position": 52034,
                    "checkpoints_checked": 0,
                    "problem": {
                        "kind": "altered",
                        "detail": f"order {_ORDER_ID} version 3 at position 4211: the stored "
                        "event (its payload or its metadata) does not match its hash chain",
                        "position": 4211,
                        "order_id": _ORDER_ID,
                        "version": 3,
                    },
                }
            ]
        }
    )

    ok: bool
    order_id: str | None
    head: int
    events_checked: int
    aggregates_checked: int
    chained_events: int
    chain_starts_at: int | None = Field(description="Position of the first chained event.")
    unchained_events: int = Field(description="Events recorded before chaining began.")
    audit_log_position: int | None
    checkpoints_checked: int
    problem: VerifyProblemPublic | None


class PersonalOrderPublic(BaseModel):
    """One order's personal data, as held (``[erased]`` once erased)."""

    order_id: str
    placed_at: datetime
    status: str
    currency: str
    total: int
    carrier: str | None
    customer_email: str | None
    shipping_address: str | None
    client_reference: str | None
    tracking_number: str | None


class PersonalDataPublic(BaseModel):
    """Everything held about a customer."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "customer_id": "cust-42",
                    "data_keys": True,
                    "orders": [
                        {
                            "order_id": _ORDER_ID,
                            "placed_at": _AT,
                            "status": "shipped",
                            "currency": "EUR",
                            "total": 3000,
                            "carrier": "DHL",
                            "customer_email": "ana@example.com",
                            "shipping_address": "1 Quay Street, Dublin",
                            "client_reference": None,
                            "tracking_number": "JD0146000",
                        }
                    ],
                }
            ]
        }
    )

    customer_id: str
    data_keys: bool = Field(
        description="Whether the customer still has data keys (false once erased)."
    )
    orders: list[PersonalOrderPublic]


class ErasurePublic(BaseModel):
    """An erasure, recorded at ``position``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"customer_id": "cust-42", "position": 5120, "keys_erased": 1}]
        }
    )

    customer_id: str
    position: int = Field(description="Where the erasure event was recorded.")
    keys_erased: int = Field(description="Data keys deleted (0 when already erased).")
