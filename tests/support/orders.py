"""Orders for tests: one shop's SKUs, prices and customers, and the stories its orders go through.

A story is a few steps (pay a part, ship, refund half ...) written once against
OrderCommands: an in-memory Order has those commands itself, so orders are made fast and
saved in bulk (generate_orders); a LedgerOrder issues them as ledger commands, one order after
another (place_and_follow) or interleaved and logged for read models to be checked against
(OrderMix).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from domain.ledger import OrderLedger
from domain.order import Order
from tests.support.projections import LedgerClock

CUSTOMERS: dict[str, str] = {
    "cust-alice": "EUR",
    "cust-bruno": "USD",
    "cust-chiyo": "JPY",
    "cust-dmitri": "EUR",
    "cust-eleanor": "GBP",
    "cust-farah": "USD",
}
"""Customers and the currency each mostly pays in."""

CURRENCIES = ("EUR", "USD", "JPY", "GBP")

SKU_PRICES: dict[str, dict[str, int]] = {
    "TEA-SENCHA-100G": {"EUR": 1250, "USD": 1399, "JPY": 1800, "GBP": 1099},
    "MUG-STONEWARE": {"EUR": 2490, "USD": 2699, "JPY": 3900, "GBP": 2150},
    "KETTLE-CAST-IRON": {"EUR": 8900, "USD": 9500, "JPY": 14800, "GBP": 7800},
    "WHISK-BAMBOO": {"EUR": 1599, "USD": 1750, "JPY": 2400, "GBP": 1399},
    "FILTER-PAPER-100": {"EUR": 399, "USD": 450, "JPY": 550, "GBP": 349},
    "TRAY-WALNUT": {"EUR": 4500, "USD": 4900, "JPY": 7200, "GBP": 3950},
    "CADDY-TIN": {"EUR": 1100, "USD": 1200, "JPY": 1650, "GBP": 990},
    "SCOOP-BRASS": {"EUR": 750, "USD": 820, "JPY": 1100, "GBP": 650},
}
"""Unit prices in minor units (yen have none)."""

Line = tuple[str, int, int]
"""SKU, quantity, unit price in minor units."""

Lines = dict[str, tuple[int, int]]
"""An order's lines: quantity and unit price by SKU."""


def draw_order(rng: random.Random) -> tuple[str, str, Lines]:
    """A customer, the currency of the order (mostly theirs) and one to three lines in it."""
    customer = rng.choice(sorted(CUSTOMERS))
    currency = CUSTOMERS[customer]
    if rng.random() < 0.2:
        currency = rng.choice([c for c in CURRENCIES if c != currency])
    skus = rng.sample(sorted(SKU_PRICES), rng.randint(1, 3))
    return customer, currency, {sku: (rng.randint(1, 5), SKU_PRICES[sku][currency]) for sku in skus}


def line_items(lines: Lines) -> list[dict[str, Any]]:
    """Lines as a command takes them."""
    return [{"sku": sku, "quantity": q, "unit_price": p} for sku, (q, p) in lines.items()]


# -- stories ----------------------------------------------------------------------------------


class OrderCommands(Protocol):
    """One order as a story sees it: the Order aggregate's commands and the state they leave.

    An in-memory Order is one; a LedgerOrder is one that issues each command to the ledger.
    """

    @property
    def id(self) -> UUID: ...

    @property
    def currency(self) -> str: ...

    @property
    def lines(self) -> Mapping[str, object]: ...

    @property
    def total(self) -> int: ...

    @property
    def captured(self) -> int: ...

    @property
    def refunded(self) -> int: ...

    def add_line(self, *, sku: str, quantity: int, unit_price: int) -> None: ...

    def remove_line(self, *, sku: str) -> None: ...

    def capture_payment(self, *, amount: int, payment_reference: str) -> None: ...

    def ship(self, *, carrier: str, tracking_number: str) -> None: ...

    def deliver(self) -> None: ...

    def cancel(self, *, reason: str) -> None: ...

    def issue_refund(self, *, amount: int, reason: str) -> None: ...


Step = Callable[[OrderCommands, random.Random], None]
Story = tuple[Step, ...]


def add_line(order: OrderCommands, rng: random.Random) -> None:
    sku = rng.choice([s for s in sorted(SKU_PRICES) if s not in order.lines])
    quantity, price = rng.randint(1, 4), SKU_PRICES[sku][order.currency]
    order.add_line(sku=sku, quantity=quantity, unit_price=price)


def remove_first_line(order: OrderCommands, rng: random.Random) -> None:
    order.remove_line(sku=next(iter(order.lines)))


def _pay(order: OrderCommands, amount: int) -> None:
    reference = f"pay-{order.id.hex[:8]}-{order.captured}"
    order.capture_payment(amount=amount, payment_reference=reference)


def pay_part(order: OrderCommands, rng: random.Random) -> None:
    _pay(order, max(1, order.total // 3))


def pay_in_full(order: OrderCommands, rng: random.Random) -> None:
    _pay(order, order.total - order.captured)


def ship(order: OrderCommands, rng: random.Random) -> None:
    order.ship(carrier="DHL", tracking_number=order.id.hex)


def deliver(order: OrderCommands, rng: random.Random) -> None:
    order.deliver()


def cancel(order: OrderCommands, rng: random.Random) -> None:
    order.cancel(reason="customer changed their mind")


def refund_half(order: OrderCommands, rng: random.Random) -> None:
    order.issue_refund(amount=max(1, (order.captured - order.refunded) // 2), reason="goodwill")


def refund_all(order: OrderCommands, rng: random.Random) -> None:
    order.issue_refund(amount=order.captured - order.refunded, reason="goodwill")


STORIES: tuple[Story, ...] = (
    (add_line,),
    (add_line, remove_first_line, pay_in_full, ship, deliver),
    (pay_part, pay_in_full, ship),
    (pay_part,),
    (add_line, remove_first_line, cancel),
    (pay_part, cancel, refund_all),
    (pay_in_full, cancel, refund_half, refund_all),
    (pay_in_full, ship, deliver, refund_half),
)
"""What happens to an order after it is placed: abandoned after an edit, edited and delivered,
paid in parts, partly paid, cancelled unpaid, cancelled with a refund, fully refunded in two
parts, refunded after delivery. Each takes at least one step, so leaves two events or more."""


def follow(order: OrderCommands, rng: random.Random) -> None:
    """Take an order through a story drawn at random."""
    for step in rng.choice(STORIES):
        step(order, rng)


# -- orders in memory, saved in bulk ----------------------------------------------------------


def generate_orders(ledger: OrderLedger, *, events: int, seed: int, per_save: int = 500) -> int:
    """Record orders until at least ``events`` new events are in the store; return the head.

    Each order is placed and taken through its story in memory with the aggregate's own
    commands, and saved with several hundred others in one transaction.
    """
    rng = random.Random(seed)
    recorded = 0
    while recorded < events:
        orders = []
        for _ in range(per_save):
            customer, currency, lines = draw_order(rng)
            order = Order.place(customer_id=customer, currency=currency, lines=line_items(lines))
            follow(order, rng)
            orders.append(order)
        recorded += sum(len(order.pending_events) for order in orders)
        ledger.save(*orders)
    return ledger.head_position()


# -- orders through the ledger's commands -----------------------------------------------------

PLACED = "placed"
LINE_ADDED = "line_added"
LINE_REMOVED = "line_removed"
PAYMENT = "payment"
SHIPPED = "shipped"
DELIVERED = "delivered"
CANCELLED = "cancelled"
REFUND = "refund"

Issued = Callable[[str, "LedgerOrder", tuple[Line, ...], int], None]
"""Told of each command a LedgerOrder issued: its kind, the order, its lines and amount."""


def _ignore(kind: str, order: LedgerOrder, lines: tuple[Line, ...], amount: int) -> None:
    """Nobody is told."""


@dataclass(eq=False)
class LedgerOrder:
    """An order driven through the ledger's commands; it keeps what a story needs to know.

    ``issued`` hears of every command after the ledger took it: the lines it names (the
    order's as placed or as cancelled, the line added or removed) and the amount it moved.
    """

    ledger: OrderLedger
    id: UUID
    customer_id: str
    currency: str
    lines: Lines
    issued: Issued = _ignore
    captured: int = 0
    refunded: int = 0

    @classmethod
    def place(
        cls,
        ledger: OrderLedger,
        customer_id: str,
        currency: str,
        lines: Lines,
        issued: Issued = _ignore,
    ) -> LedgerOrder:
        """Place the order through the ledger."""
        result = ledger.place_order(
            customer_id=customer_id, currency=currency, lines=line_items(lines)
        )
        order = cls(ledger, result.order_id, customer_id, currency, lines, issued)
        issued(PLACED, order, _as_tuple(lines), 0)
        return order

    @property
    def total(self) -> int:
        return sum(quantity * price for quantity, price in self.lines.values())

    def add_line(self, *, sku: str, quantity: int, unit_price: int) -> None:
        self.ledger.add_line(self.id, sku=sku, quantity=quantity, unit_price=unit_price)
        self.lines[sku] = (quantity, unit_price)
        self.issued(LINE_ADDED, self, ((sku, quantity, unit_price),), 0)

    def remove_line(self, *, sku: str) -> None:
        self.ledger.remove_line(self.id, sku=sku)
        quantity, price = self.lines.pop(sku)
        self.issued(LINE_REMOVED, self, ((sku, quantity, price),), 0)

    def capture_payment(self, *, amount: int, payment_reference: str) -> None:
        self.ledger.capture_payment(self.id, amount=amount, payment_reference=payment_reference)
        self.captured += amount
        self.issued(PAYMENT, self, (), amount)

    def ship(self, *, carrier: str, tracking_number: str) -> None:
        self.ledger.ship_order(self.id, carrier=carrier, tracking_number=tracking_number)
        self.issued(SHIPPED, self, (), 0)

    def deliver(self) -> None:
        self.ledger.deliver_order(self.id)
        self.issued(DELIVERED, self, (), 0)

    def cancel(self, *, reason: str) -> None:
        self.ledger.cancel_order(self.id, reason=reason)
        self.issued(CANCELLED, self, _as_tuple(self.lines), 0)

    def issue_refund(self, *, amount: int, reason: str) -> None:
        self.ledger.issue_refund(self.id, amount=amount, reason=reason)
        self.refunded += amount
        self.issued(REFUND, self, (), amount)


def _as_tuple(lines: Lines) -> tuple[Line, ...]:
    return tuple((sku, quantity, price) for sku, (quantity, price) in lines.items())


def place_and_follow(ledger: OrderLedger, rng: random.Random) -> None:
    """Place an order through the ledger and take it through a story drawn at random."""
    follow(LedgerOrder.place(ledger, *draw_order(rng)), rng)


@dataclass(frozen=True)
class IssuedCommand:
    """One command a test issued, with every figure a read model should learn from it.

    ``lines`` holds the order's lines as placed, the line added or removed, or the lines the
    order held when it was cancelled.
    """

    kind: str
    order_id: UUID
    customer_id: str
    currency: str
    at: datetime
    lines: tuple[Line, ...] = ()
    amount: int = 0


@dataclass(eq=False)
class _Playing:
    """An order of the mix and the steps of its story still to come."""

    order: LedgerOrder
    steps: list[Step]


@dataclass
class OrderMix:
    """Drives a realistic, interleaved mix of orders through the ledger and logs every command.

    Orders are placed over several days (crossing UTC midnight) by several customers in EUR,
    USD, GBP and JPY; each follows one of the STORIES in turn, and the steps of different
    orders interleave so that one batch of events holds an order's placement and its later
    events together.
    """

    ledger: OrderLedger
    clock: LedgerClock
    seed: int = 20240330
    log: list[IssuedCommand] = field(default_factory=list)
    _placed: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def place(self, orders: int = 24) -> list[IssuedCommand]:
        """Place ``orders`` orders and play every step of their stories; return the commands."""
        first = len(self.log)
        stories = [STORIES[i % len(STORIES)] for i in range(self._placed, self._placed + orders)]
        self.rng.shuffle(stories)
        active: list[_Playing] = []
        while stories or active:
            self.clock.advance(minutes=self.rng.randint(3, 95))
            if stories and (not active or self.rng.random() < 0.45):
                order = LedgerOrder.place(self.ledger, *draw_order(self.rng), self._record)
                active.append(_Playing(order, list(stories.pop())))
                continue
            playing = self.rng.choice(active)
            playing.steps.pop(0)(playing.order, self.rng)
            if not playing.steps:
                active.remove(playing)
        self._placed += orders
        return self.log[first:]

    def _record(self, kind: str, order: LedgerOrder, lines: tuple[Line, ...], amount: int) -> None:
        self.log.append(
            IssuedCommand(
                kind=kind,
                order_id=order.id,
                customer_id=order.customer_id,
                currency=order.currency,
                at=self.clock.now,
                lines=lines,
                amount=amount,
            )
        )
