"""Request and response bodies, named by role; the domain still checks every rule."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)

from domain.money import MAX_AMOUNT, MINOR_UNITS
from domain.order import (
    MAX_ADDRESS_LENGTH,
    MAX_EMAIL_LENGTH,
    MAX_ID_LENGTH,
    MAX_LINES,
    MAX_QUANTITY,
    MAX_REASON_LENGTH,
    MAX_REFERENCE_LENGTH,
)

# Strict: JSON 10.0 or "10" is refused rather than quietly turned into money.
MinorUnits = Annotated[
    StrictInt,
    Field(
        ge=0,
        le=MAX_AMOUNT,
        description=f"Integer minor units (cents), at most {MAX_AMOUNT} (10**15), which is "
        "also the largest order total.",
    ),
]
# Bounds the domain checks itself (its problem names the rule) are only documented here.
Quantity = Annotated[
    StrictInt,
    Field(ge=0, le=MAX_AMOUNT, json_schema_extra={"minimum": 1, "maximum": MAX_QUANTITY}),
]
# Text the domain accepts: not blank, no control characters (free text may hold newlines
# and tabs). Documented as patterns; domain.order.bounded_text enforces them.
_LINE = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
_FREE_TEXT = r"^[^\x00-\x08\x0b-\x1f\x7f-\x9f]*\S[^\x00-\x08\x0b-\x1f\x7f-\x9f]*$"


def _text(max_length: int, pattern: str) -> Any:
    return Field(min_length=1, max_length=max_length, json_schema_extra={"pattern": pattern})


Identifier = Annotated[StrictStr, _text(MAX_ID_LENGTH, _LINE)]
Reference = Annotated[StrictStr, _text(MAX_REFERENCE_LENGTH, _LINE)]
Address = Annotated[StrictStr, _text(MAX_ADDRESS_LENGTH, _FREE_TEXT)]
Reason = Annotated[StrictStr, _text(MAX_REASON_LENGTH, _FREE_TEXT)]
Email = Annotated[
    StrictStr,
    Field(min_length=3, max_length=MAX_EMAIL_LENGTH, examples=["ada@example.com"]),
]
# The schema lists the active ISO 4217 codes; the domain refuses any other with its own problem.
Currency = Annotated[
    StrictStr,
    Field(pattern=r"^[A-Z]{3}$", description="Active ISO 4217 code.", examples=["EUR"]),
    WithJsonSchema(
        {"type": "string", "enum": sorted(MINOR_UNITS), "description": "Active ISO 4217 code."}
    ),
]

_LINE_EXAMPLE: dict[str, JsonValue] = {"sku": "SKU-1", "quantity": 2, "unit_price": 1250}


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests -------------------------------------------------------------------------------


class LineIn(_Command):
    """One line of a new order."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_LINE_EXAMPLE]})

    sku: Identifier
    quantity: Quantity
    unit_price: MinorUnits


class OrderCreate(_Command):
    """Place an order."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "customer_id": "cust-42",
                    "currency": "EUR",
                    "lines": [_LINE_EXAMPLE],
                    "shipping_address": "1 Quay Street, Dublin",
                    "client_reference": "cart-9f1c",
                    "customer_email": "ada@example.com",
                }
            ]
        },
    )

    customer_id: Identifier
    currency: Currency
    lines: Annotated[list[LineIn], Field(json_schema_extra={"minItems": 1, "maxItems": MAX_LINES})]
    shipping_address: Address | None = None
    client_reference: Reference | None = None
    customer_email: Email | None = None


class LineCreate(LineIn):
    """Add a line to an order that has no payment yet."""


class PaymentCreate(_Command):
    """Capture part or all of an order's balance."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"amount": 2500, "payment_reference": "psp-7781"}]},
    )

    amount: MinorUnits
    payment_reference: Reference


class ShipmentCreate(_Command):
    """Hand a fully paid order to a carrier."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"carrier": "DHL", "tracking_number": "JD0146000"}]},
    )

    carrier: Identifier
    tracking_number: Reference


class DeliveryCreate(_Command):
    """Record delivery; there is nothing to say beyond the order's id."""


class CancellationCreate(_Command):
    """Cancel an order that has not shipped."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"reason": "customer changed mind"}]}
    )

    reason: Reason


class RefundCreate(_Command):
    """Give back captured money."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"amount": 1250, "reason": "damaged in transit"}]},
    )

    amount: MinorUnits
    reason: Reason


# -- responses ------------------------------------------------------------------------------

_ORDER_ID = "0d9b1f5e-3c1a-4f55-9a7e-2b8f6f3f8a10"
_HISTORY_EXAMPLE: dict[str, JsonValue] = {
    "order_id": _ORDER_ID,
    "events": [
        {
            "position": 1040,
            "version": 1,
            "type": "OrderPlaced",
            "timestamp": "2026-01-31T12:00:00Z",
            "data": {"customer_id": "cust-42", "currency": "EUR", "lines": [_LINE_EXAMPLE]},
            "metadata": {
                "event_id": "5b0f3a52-8d4e-4c1e-9a4f-0c8e6f2d7b11",
                "actor": {"kind": "key", "id": "key_3f9a", "name": "checkout", "role": "writer"},
                "request_id": "4f6c2b8e9d0a4e1fb3c5d7e9f1a3b5c7",
                "correlation_id": "checkout-7781",
                "causation_id": "0c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f",
            },
        },
        {
            "position": 1041,
            "version": 2,
            "type": "PaymentCaptured",
            "timestamp": "2026-01-31T12:05:00Z",
            "data": {"amount": 2500, "payment_reference": "psp-7781"},
            "metadata": {
                "event_id": "9d2e4f60-1b3c-4d5e-8f7a-6b5c4d3e2f10",
                "actor": {"kind": "key", "id": "key_7c21", "name": "payments", "role": "writer"},
                "request_id": "8e1f0a2b3c4d4e5f8a9b0c1d2e3f4a5b",
                "correlation_id": "checkout-7781",
                "causation_id": "6f7e8d9c-0b1a-4c2d-9e3f-4a5b6c7d8e9f",
            },
        },
    ],
}
_STATE_EXAMPLE: dict[str, JsonValue] = {
    "order_id": _ORDER_ID,
    "version": 2,
    "status": "paid",
    "customer_id": "cust-42",
    "currency": "EUR",
    "lines": [_LINE_EXAMPLE],
    "total": 2500,
    "captured": 2500,
    "refunded": 0,
    "balance_due": 0,
    "refund_due": 0,
    "payment_references": ["psp-7781"],
    "shipping_address": "1 Quay Street, Dublin",
    "client_reference": "cart-9f1c",
    "customer_email": "ada@example.com",
    "carrier": None,
    "tracking_number": None,
    "placed_at": "2026-01-31T12:00:00Z",
    "updated_at": "2026-01-31T12:05:00Z",
    "shipped_at": None,
    "delivered_at": None,
    "cancelled_at": None,
    "cancellation_reason": None,
}


class CommandAccepted(BaseModel):
    """A recorded command: the order, its new version and the global position of its event."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "order_id": "0d9b1f5e-3c1a-4f55-9a7e-2b8f6f3f8a10",
                    "version": 3,
                    "position": 1041,
                }
            ]
        }
    )

    order_id: UUID
    version: int
    position: int


class ActorOut(BaseModel):
    """Who issued the command: an API key (``key``, with its id, name and role; never the
    token), the command line (``cli``, with the operating system's user) or a component;
    ``unknown`` for events recorded before actors were."""

    kind: str = Field(examples=["key", "cli", "unknown"])
    id: str
    name: str
    role: str


class EventMetadata(BaseModel):
    """Recorded with the event, immutably: ``unknown`` for events recorded before it was."""

    event_id: str
    actor: ActorOut
    request_id: str = Field(description="X-Request-ID of the request that issued the command.")
    correlation_id: str = Field(
        description="Correlation-Id or the traceparent's trace id as sent, else the request id."
    )
    causation_id: str = Field(description="The id of the command that recorded the event.")


class HistoryEvent(BaseModel):
    """One recorded event of an order."""

    position: int
    version: int
    type: str = Field(examples=["PaymentCaptured"])
    timestamp: datetime
    data: dict[str, Any] = Field(examples=[{"amount": 2500, "payment_reference": "psp-7781"}])
    metadata: EventMetadata


class OrderHistory(BaseModel):
    """Every event of an order, oldest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [_HISTORY_EXAMPLE]})

    order_id: UUID
    events: list[HistoryEvent]


class LineOut(BaseModel):
    """One line of an order."""

    sku: str
    quantity: int
    unit_price: int


class OrderState(BaseModel):
    """An order as it stands (or stood at a version or moment)."""

    model_config = ConfigDict(json_schema_extra={"examples": [_STATE_EXAMPLE]})

    order_id: UUID
    version: int
    status: Literal[
        "pending_payment", "partially_paid", "paid", "shipped", "delivered", "cancelled"
    ]
    customer_id: str
    currency: str
    lines: list[LineOut]
    total: int
    captured: int
    refunded: int
    balance_due: int
    refund_due: int
    payment_references: list[str]
    shipping_address: str | None
    client_reference: str | None
    customer_email: str | None
    carrier: str | None
    tracking_number: str | None
    placed_at: datetime
    updated_at: datetime
    shipped_at: datetime | None
    delivered_at: datetime | None
    cancelled_at: datetime | None
    cancellation_reason: str | None


class Health(BaseModel):
    """The service answers and so does its event store."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: Literal["ok"]


class FieldError(BaseModel):
    """One input that failed validation."""

    loc: list[str | int] = Field(examples=[["body", "lines", 0, "quantity"]])
    field: str = Field(examples=["body.lines.0.quantity"])
    message: str = Field(examples=["Input should be a valid integer"])


class Problem(BaseModel):
    """An RFC 9457 problem document (served as application/problem+json)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "https://orderledger.dev/problems/payment-exceeds-total",
                    "title": "Payment exceeds total",
                    "status": 409,
                    "detail": "capturing 9000 would exceed the order total 2500 "
                    "(0 already captured, 2500 due)",
                    "instance": "/orders/0d9b1f5e-3c1a-4f55-9a7e-2b8f6f3f8a10/payments",
                }
            ]
        }
    )

    type: str
    title: str
    status: int
    detail: str
    instance: str
    errors: list[FieldError] | None = Field(
        default=None, description="Present on validation problems: each invalid input."
    )
    current_version: int | None = Field(
        default=None, description="Present on version conflicts: the order's version now."
    )
