"""The Order aggregate: its past-tense events and the rules that guard them."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate, event

from domain.errors import (
    DuplicateLineError,
    DuplicatePaymentReferenceError,
    InvalidAmountError,
    InvalidCommandError,
    LastLineRemovalError,
    LineNotFoundError,
    LinesLockedError,
    OrderAlreadyDeliveredError,
    OrderAlreadyShippedError,
    OrderCancelledError,
    OrderNotFullyPaidError,
    OrderNotShippedError,
    PaymentExceedsTotalError,
    RefundExceedsCapturedError,
)
from domain.money import MAX_AMOUNT, validate_amount, validate_currency
from domain.summary import OrderStatus, balance_due, order_status, refund_due

__all__ = ["EVENT_TYPES", "Order", "OrderLine", "OrderStatus"]

MAX_LINES = 100
MAX_QUANTITY = 1_000_000
MAX_ID_LENGTH = 64
MAX_REFERENCE_LENGTH = 128
MAX_ADDRESS_LENGTH = 500
MAX_REASON_LENGTH = 500


def bounded_text(value: object, *, name: str, max_length: int, multiline: bool = False) -> str:
    """Return the text if it is non-blank, printable and at most max_length characters.

    Only free text (``multiline``) may hold newlines and tabs. Lone surrogates are refused
    because they cannot be encoded as UTF-8, so the store could never record them.
    """
    if not isinstance(value, str):
        raise InvalidCommandError(f"{name} must be a string")
    if not value.strip():
        raise InvalidCommandError(f"{name} must not be blank")
    if len(value) > max_length:
        raise InvalidCommandError(
            f"{name} must be at most {max_length} characters, got {len(value)}"
        )
    allowed = "\n\t" if multiline else ""
    for ch in value:
        category = unicodedata.category(ch)
        if category == "Cc" and ch not in allowed:
            raise InvalidCommandError(f"{name} must not contain control characters")
        if category == "Cs":
            raise InvalidCommandError(f"{name} must not contain unpaired surrogates")
    return value


def optional_text(
    value: object, *, name: str, max_length: int, multiline: bool = False
) -> str | None:
    """Like bounded_text, but None passes through."""
    if value is None:
        return None
    return bounded_text(value, name=name, max_length=max_length, multiline=multiline)


_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
MAX_EMAIL_LENGTH = 254


def validate_email(value: object) -> str:
    """Return the address if it looks like one (local@domain.tld, at most 254 characters)."""
    text = bounded_text(value, name="customer_email", max_length=MAX_EMAIL_LENGTH)
    if not _EMAIL.fullmatch(text):
        raise InvalidCommandError(f"customer_email {text!r} is not an email address")
    return text


@dataclass(frozen=True)
class OrderLine:
    """One SKU on an order: quantity times unit price in minor units."""

    sku: str
    quantity: int
    unit_price: int

    @property
    def amount(self) -> int:
        return self.quantity * self.unit_price

    def as_dict(self) -> dict[str, Any]:
        return {"sku": self.sku, "quantity": self.quantity, "unit_price": self.unit_price}

    @classmethod
    def validated(cls, sku: object, quantity: object, unit_price: object) -> OrderLine:
        """Build a line from untrusted input, raising a domain error if out of bounds."""
        sku = bounded_text(sku, name="sku", max_length=MAX_ID_LENGTH)
        if isinstance(quantity, bool) or not isinstance(quantity, int):
            raise InvalidAmountError(f"quantity of {sku!r} must be an integer")
        if not 0 < quantity <= MAX_QUANTITY:
            raise InvalidAmountError(
                f"quantity of {sku!r} must be between 1 and {MAX_QUANTITY}, got {quantity}"
            )
        price = validate_amount(unit_price, name=f"unit_price of {sku!r}", minimum=0)
        return cls(sku=sku, quantity=quantity, unit_price=price)


class Order(Aggregate):
    """An order: placed once, then paid, shipped and delivered, or cancelled and refunded."""

    class Placed(Aggregate.Created):
        """The order was placed.

        Version 2 added ``client_reference`` and version 3 ``customer_email``; the upcasters
        give events stored in older shapes ``None`` for them.
        """

        class_version = 3

        customer_id: str
        currency: str
        lines: list[dict[str, Any]]
        shipping_address: str | None
        client_reference: str | None
        customer_email: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["client_reference"] = None

        @staticmethod
        def upcast_v2_v3(state: dict[str, Any]) -> None:
            state["customer_email"] = None

    class LineAdded(Aggregate.Event):
        sku: str
        quantity: int
        unit_price: int

    class LineRemoved(Aggregate.Event):
        sku: str

    class PaymentCaptured(Aggregate.Event):
        amount: int
        payment_reference: str

    # The aggregate's modified_on moves to the event's time only after the event is applied,
    # so events that stamp a moment on the order read their own timestamp here.

    class Shipped(Aggregate.Event):
        carrier: str
        tracking_number: str

        def apply(self, aggregate: Any) -> None:
            aggregate.shipped_at = self.timestamp

    class Delivered(Aggregate.Event):
        def apply(self, aggregate: Any) -> None:
            aggregate.delivered_at = self.timestamp

    class Cancelled(Aggregate.Event):
        reason: str

        def apply(self, aggregate: Any) -> None:
            aggregate.cancelled_at = self.timestamp

    class RefundIssued(Aggregate.Event):
        amount: int
        reason: str

    @event(Placed)
    def __init__(
        self,
        customer_id: str,
        currency: str,
        lines: list[dict[str, Any]],
        shipping_address: str | None,
        client_reference: str | None,
        customer_email: str | None,
    ) -> None:
        self.customer_id = customer_id
        self.customer_email = customer_email
        self.currency = currency
        self.lines: dict[str, OrderLine] = {}
        for line in lines:
            self.lines[line["sku"]] = OrderLine(line["sku"], line["quantity"], line["unit_price"])
        self.shipping_address = shipping_address
        self.client_reference = client_reference
        self.captured = 0
        self.refunded = 0
        self.payment_references: list[str] = []
        self.carrier: str | None = None
        self.tracking_number: str | None = None
        self.shipped_at: datetime | None = None
        self.delivered_at: datetime | None = None
        self.cancelled_at: datetime | None = None
        self.cancellation_reason: str | None = None

    # -- commands ---------------------------------------------------------------------------

    @classmethod
    def place(
        cls,
        *,
        customer_id: str,
        currency: str,
        lines: Iterable[Mapping[str, Any]],
        shipping_address: str | None = None,
        client_reference: str | None = None,
        customer_email: str | None = None,
    ) -> Order:
        """Place a new order after checking every part of it."""
        customer_id = bounded_text(customer_id, name="customer_id", max_length=MAX_ID_LENGTH)
        currency = validate_currency(currency)
        if isinstance(lines, str | bytes | Mapping) or not isinstance(lines, Iterable):
            raise InvalidCommandError("lines must be a list of lines")
        validated: dict[str, OrderLine] = {}
        for raw in lines:
            # Stop at the first line too many, so an endless input costs nothing to refuse.
            if len(validated) >= MAX_LINES:
                raise InvalidCommandError(f"an order has at most {MAX_LINES} lines")
            if not isinstance(raw, Mapping):
                raise InvalidCommandError("each line must have a sku, quantity and unit_price")
            line = OrderLine.validated(raw.get("sku"), raw.get("quantity"), raw.get("unit_price"))
            if line.sku in validated:
                raise DuplicateLineError(f"SKU {line.sku!r} appears on more than one line")
            validated[line.sku] = line
        if not validated:
            raise InvalidCommandError("an order needs at least one line")
        if sum(line.amount for line in validated.values()) > MAX_AMOUNT:
            raise InvalidAmountError(
                f"the order total exceeds the largest order total, {MAX_AMOUNT} minor units"
            )
        return cls(
            customer_id=customer_id,
            currency=currency,
            lines=[line.as_dict() for line in validated.values()],
            shipping_address=optional_text(
                shipping_address,
                name="shipping_address",
                max_length=MAX_ADDRESS_LENGTH,
                multiline=True,
            ),
            client_reference=optional_text(
                client_reference, name="client_reference", max_length=MAX_REFERENCE_LENGTH
            ),
            customer_email=None if customer_email is None else validate_email(customer_email),
        )

    def add_line(self, *, sku: str, quantity: int, unit_price: int) -> None:
        """Add a line for a SKU not yet on the order."""
        line = OrderLine.validated(sku, quantity, unit_price)
        self._check_lines_editable()
        if line.sku in self.lines:
            raise DuplicateLineError(f"order already has a line for SKU {line.sku!r}")
        if len(self.lines) >= MAX_LINES:
            raise InvalidCommandError(f"an order has at most {MAX_LINES} lines")
        if self.total + line.amount > MAX_AMOUNT:
            raise InvalidAmountError(
                f"the order total would exceed the largest order total, {MAX_AMOUNT} minor units"
            )
        self._line_added(sku=line.sku, quantity=line.quantity, unit_price=line.unit_price)

    def remove_line(self, *, sku: str) -> None:
        """Remove the line for a SKU, as long as another line remains."""
        sku = bounded_text(sku, name="sku", max_length=MAX_ID_LENGTH)
        self._check_lines_editable()
        if sku not in self.lines:
            raise LineNotFoundError(f"order has no line for SKU {sku!r}")
        if len(self.lines) == 1:
            raise LastLineRemovalError("an order must keep at least one line; cancel it instead")
        self._line_removed(sku=sku)

    def capture_payment(self, *, amount: int, payment_reference: str) -> None:
        """Capture part or all of the outstanding balance."""
        validate_amount(amount, name="amount")
        payment_reference = bounded_text(
            payment_reference, name="payment_reference", max_length=MAX_REFERENCE_LENGTH
        )
        if self.is_cancelled:
            raise OrderCancelledError("cannot capture a payment on a cancelled order")
        if payment_reference in self.payment_references:
            raise DuplicatePaymentReferenceError(
                f"payment {payment_reference!r} was already captured on this order"
            )
        if self.captured + amount > self.total:
            raise PaymentExceedsTotalError(
                f"capturing {amount} would exceed the order total {self.total} "
                f"({self.captured} already captured, {self.balance_due} due)"
            )
        self._payment_captured(amount=amount, payment_reference=payment_reference)

    def ship(self, *, carrier: str, tracking_number: str) -> None:
        """Hand the order to a carrier; only once it is fully paid."""
        carrier = bounded_text(carrier, name="carrier", max_length=MAX_ID_LENGTH)
        tracking_number = bounded_text(
            tracking_number, name="tracking_number", max_length=MAX_REFERENCE_LENGTH
        )
        if self.is_cancelled:
            raise OrderCancelledError("cannot ship a cancelled order")
        if self.is_shipped:
            raise OrderAlreadyShippedError("order has already shipped")
        if self.captured < self.total:
            raise OrderNotFullyPaidError(
                f"order cannot ship until fully paid ({self.balance_due} of {self.total} due)"
            )
        self._shipped(carrier=carrier, tracking_number=tracking_number)

    def deliver(self) -> None:
        """Record delivery to the customer; only after shipment."""
        if self.delivered_at is not None:
            raise OrderAlreadyDeliveredError("order has already been delivered")
        if not self.is_shipped:
            raise OrderNotShippedError("order cannot be delivered before it ships")
        self._delivered()

    def cancel(self, *, reason: str) -> None:
        """Cancel the order; only before shipment."""
        reason = bounded_text(reason, name="reason", max_length=MAX_REASON_LENGTH, multiline=True)
        if self.is_cancelled:
            raise OrderCancelledError("order is already cancelled")
        if self.is_shipped:
            raise OrderAlreadyShippedError("a shipped order cannot be cancelled")
        self._cancelled(reason=reason)

    def issue_refund(self, *, amount: int, reason: str) -> None:
        """Give back money captured and not yet refunded."""
        validate_amount(amount, name="amount")
        reason = bounded_text(reason, name="reason", max_length=MAX_REASON_LENGTH, multiline=True)
        refundable = self.captured - self.refunded
        if amount > refundable:
            raise RefundExceedsCapturedError(
                f"refund of {amount} exceeds the refundable {refundable} "
                f"({self.captured} captured, {self.refunded} already refunded)"
            )
        self._refund_issued(amount=amount, reason=reason)

    # -- events -----------------------------------------------------------------------------

    def _check_lines_editable(self) -> None:
        if self.is_cancelled:
            raise LinesLockedError("lines of a cancelled order cannot change")
        if self.is_shipped:
            raise LinesLockedError("lines of a shipped order cannot change")
        if self.captured > 0:
            raise LinesLockedError("lines cannot change once a payment has been captured")

    @event(LineAdded)
    def _line_added(self, sku: str, quantity: int, unit_price: int) -> None:
        self.lines[sku] = OrderLine(sku, quantity, unit_price)

    @event(LineRemoved)
    def _line_removed(self, sku: str) -> None:
        del self.lines[sku]

    @event(PaymentCaptured)
    def _payment_captured(self, amount: int, payment_reference: str) -> None:
        self.captured += amount
        self.payment_references.append(payment_reference)

    @event(Shipped)
    def _shipped(self, carrier: str, tracking_number: str) -> None:
        self.carrier = carrier
        self.tracking_number = tracking_number

    @event(Delivered)
    def _delivered(self) -> None:
        """Delivered.apply stamps the time."""

    @event(Cancelled)
    def _cancelled(self, reason: str) -> None:
        self.cancellation_reason = reason

    @event(RefundIssued)
    def _refund_issued(self, amount: int, reason: str) -> None:
        self.refunded += amount

    # -- derived state ------------------------------------------------------------------------

    @property
    def total(self) -> int:
        return sum(line.amount for line in self.lines.values())

    @property
    def is_cancelled(self) -> bool:
        return self.cancelled_at is not None

    @property
    def is_shipped(self) -> bool:
        return self.shipped_at is not None

    @property
    def balance_due(self) -> int:
        return balance_due(total=self.total, captured=self.captured, cancelled=self.is_cancelled)

    @property
    def refund_due(self) -> int:
        return refund_due(
            captured=self.captured, refunded=self.refunded, cancelled=self.is_cancelled
        )

    @property
    def status(self) -> str:
        return order_status(
            total=self.total,
            captured=self.captured,
            shipped=self.is_shipped,
            delivered=self.delivered_at is not None,
            cancelled=self.is_cancelled,
        )

    def snapshot(self) -> dict[str, Any]:
        """The order's state as plain data (for audit and the API)."""
        return {
            "order_id": str(self.id),
            "version": self.version,
            "status": self.status,
            "customer_id": self.customer_id,
            "currency": self.currency,
            "lines": [line.as_dict() for line in self.lines.values()],
            "total": self.total,
            "captured": self.captured,
            "refunded": self.refunded,
            "balance_due": self.balance_due,
            "refund_due": self.refund_due,
            "payment_references": list(self.payment_references),
            "shipping_address": self.shipping_address,
            "client_reference": self.client_reference,
            "customer_email": self.customer_email,
            "carrier": self.carrier,
            "tracking_number": self.tracking_number,
            "placed_at": self.created_on.isoformat(),
            "updated_at": self.modified_on.isoformat(),
            "shipped_at": self.shipped_at.isoformat() if self.shipped_at else None,
            "delivered_at": self.delivered_at.isoformat() if self.delivered_at else None,
            "cancelled_at": self.cancelled_at.isoformat() if self.cancelled_at else None,
            "cancellation_reason": self.cancellation_reason,
        }


EVENT_TYPES: dict[str, type[Aggregate.Event]] = {
    "OrderPlaced": Order.Placed,
    "OrderLineAdded": Order.LineAdded,
    "OrderLineRemoved": Order.LineRemoved,
    "PaymentCaptured": Order.PaymentCaptured,
    "OrderShipped": Order.Shipped,
    "OrderDelivered": Order.Delivered,
    "OrderCancelled": Order.Cancelled,
    "RefundIssued": Order.RefundIssued,
}
"""Public, stable names of the order events (used in history, webhooks and projections)."""

PERSONAL_FIELDS: dict[type[Any], tuple[str, ...]] = {
    Order.Placed: ("shipping_address", "client_reference", "customer_email"),
    Order.Shipped: ("tracking_number",),
}
"""The fields that hold personal data, sealed with the customer's key (domain/personal.py).

``client_reference`` is free text a client may fill with anything; a tracking number leads to
the delivery address. ``customer_id`` is a pseudonymous id and the carrier a company: neither is
sealed."""
