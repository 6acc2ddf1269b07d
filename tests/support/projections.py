"""Helpers for projection tests: a settable event clock, a realistic order mix, catching up."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import select

from domain.ledger import OrderLedger
from projections.engine.catalog import BUILDING
from projections.engine.processor import ProcessorSettings
from projections.engine.runtime import ProjectionRuntime
from projections.engine.worker import Worker

PLACED = "placed"
LINE_ADDED = "line_added"
LINE_REMOVED = "line_removed"
PAYMENT = "payment"
SHIPPED = "shipped"
DELIVERED = "delivered"
CANCELLED = "cancelled"
REFUND = "refund"

Line = tuple[str, int, int]
"""SKU, quantity, unit price in minor units."""


class LedgerClock:
    """The moment every new event is stamped with; it moves only when a test moves it."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


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


@dataclass
class _OrderState:
    """What the test itself knows about an order it is driving."""

    order_id: UUID
    customer_id: str
    currency: str
    lines: dict[str, tuple[int, int]]
    steps: list[Callable[[_OrderState], None]]
    captured: int = 0
    refunded: int = 0

    @property
    def total(self) -> int:
        return sum(quantity * price for quantity, price in self.lines.values())


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


@dataclass
class OrderMix:
    """Drives a realistic, interleaved mix of orders through the ledger and logs every command.

    Orders are placed over several days (crossing UTC midnight) by several customers in EUR,
    USD, GBP and JPY; each follows one of eight stories (abandoned, edited and delivered, paid
    in parts, partly paid, cancelled unpaid, cancelled with a refund, fully refunded in two
    parts, refunded after delivery), and the steps of different orders interleave so that
    one batch of events holds an order's placement and its later events together.
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
        stories = [self._stories()[i % 8] for i in range(self._placed, self._placed + orders)]
        self.rng.shuffle(stories)
        active: list[_OrderState] = []
        while stories or active:
            self.clock.advance(minutes=self.rng.randint(3, 95))
            if stories and (not active or self.rng.random() < 0.45):
                active.append(self._place_one(stories.pop()))
                continue
            order = self.rng.choice(active)
            order.steps.pop(0)(order)
            if not order.steps:
                active.remove(order)
        self._placed += orders
        return self.log[first:]

    # -- stories --------------------------------------------------------------------------------

    def _stories(self) -> list[list[Callable[[_OrderState], None]]]:
        return [
            [self._add_line],
            [self._add_line, self._remove_first_line, self._pay_in_full, self._ship, self._deliver],
            [self._pay_part, self._pay_in_full, self._ship],
            [self._pay_part],
            [self._add_line, self._remove_first_line, self._cancel],
            [self._pay_part, self._cancel, self._refund_all],
            [self._pay_in_full, self._cancel, self._refund_half, self._refund_all],
            [self._pay_in_full, self._ship, self._deliver, self._refund_half],
        ]

    def _place_one(self, steps: list[Callable[[_OrderState], None]]) -> _OrderState:
        customer = self.rng.choice(sorted(CUSTOMERS))
        currency = CUSTOMERS[customer]
        if self.rng.random() < 0.2:
            currency = self.rng.choice([c for c in CURRENCIES if c != currency])
        skus = self.rng.sample(sorted(SKU_PRICES), self.rng.randint(1, 3))
        lines = {sku: (self.rng.randint(1, 5), SKU_PRICES[sku][currency]) for sku in skus}
        result = self.ledger.place_order(
            customer_id=customer,
            currency=currency,
            lines=[{"sku": s, "quantity": q, "unit_price": p} for s, (q, p) in lines.items()],
        )
        order = _OrderState(result.order_id, customer, currency, lines, list(steps))
        self._record(PLACED, order, lines=_lines(lines))
        return order

    def _add_line(self, order: _OrderState) -> None:
        sku = self.rng.choice([s for s in sorted(SKU_PRICES) if s not in order.lines])
        quantity, price = self.rng.randint(1, 4), SKU_PRICES[sku][order.currency]
        self.ledger.add_line(order.order_id, sku=sku, quantity=quantity, unit_price=price)
        order.lines[sku] = (quantity, price)
        self._record(LINE_ADDED, order, lines=((sku, quantity, price),))

    def _remove_first_line(self, order: _OrderState) -> None:
        sku = next(iter(order.lines))
        quantity, price = order.lines.pop(sku)
        self.ledger.remove_line(order.order_id, sku=sku)
        self._record(LINE_REMOVED, order, lines=((sku, quantity, price),))

    def _pay(self, order: _OrderState, amount: int) -> None:
        reference = f"pay-{order.order_id.hex[:8]}-{order.captured}"
        self.ledger.capture_payment(order.order_id, amount=amount, payment_reference=reference)
        order.captured += amount
        self._record(PAYMENT, order, amount=amount)

    def _pay_part(self, order: _OrderState) -> None:
        self._pay(order, max(1, order.total // 3))

    def _pay_in_full(self, order: _OrderState) -> None:
        self._pay(order, order.total - order.captured)

    def _ship(self, order: _OrderState) -> None:
        self.ledger.ship_order(order.order_id, carrier="DHL", tracking_number=order.order_id.hex)
        self._record(SHIPPED, order)

    def _deliver(self, order: _OrderState) -> None:
        self.ledger.deliver_order(order.order_id)
        self._record(DELIVERED, order)

    def _cancel(self, order: _OrderState) -> None:
        self.ledger.cancel_order(order.order_id, reason="customer changed their mind")
        self._record(CANCELLED, order, lines=_lines(order.lines))

    def _refund(self, order: _OrderState, amount: int) -> None:
        self.ledger.issue_refund(order.order_id, amount=amount, reason="goodwill")
        order.refunded += amount
        self._record(REFUND, order, amount=amount)

    def _refund_half(self, order: _OrderState) -> None:
        self._refund(order, max(1, (order.captured - order.refunded) // 2))

    def _refund_all(self, order: _OrderState) -> None:
        self._refund(order, order.captured - order.refunded)

    def _record(
        self, kind: str, order: _OrderState, *, lines: tuple[Line, ...] = (), amount: int = 0
    ) -> None:
        self.log.append(
            IssuedCommand(
                kind=kind,
                order_id=order.order_id,
                customer_id=order.customer_id,
                currency=order.currency,
                at=self.clock.now,
                lines=lines,
                amount=amount,
            )
        )


def _lines(lines: dict[str, tuple[int, int]]) -> tuple[Line, ...]:
    return tuple((sku, quantity, price) for sku, (quantity, price) in lines.items())


def run_until_caught_up(
    runtime: ProjectionRuntime,
    only: Sequence[str] | None = None,
    *,
    batch_size: int | None = None,
) -> None:
    """Run a worker until every generation is at the head and serving; fail on a stopped one.

    The worker gives its leases back afterwards, so the next worker need not wait them out.
    """
    names = list(only) if only else [p.name for p in runtime.projections]
    settings = runtime.settings
    if batch_size is not None:
        settings = ProcessorSettings(batch_size=batch_size, lease_ttl=settings.lease_ttl)
    worker = Worker(
        runtime.catalog,
        runtime.source,
        [runtime.projection(n) for n in names],
        settings=settings,
        idle_wait=0.05,
    )
    try:
        worker.run_until_caught_up(timeout=120)
    finally:
        for processor in worker.processors.values():
            processor.release()
    for name in names:
        for row in runtime.catalog.rows(name):
            assert not row.failed, (
                f"{name} generation {row.generation} stopped at position {row.error_position} "
                f"({row.error_event_type}): {row.error_message}"
            )
            assert row.role != BUILDING, f"{name} generation {row.generation} is still building"


def table_contents(runtime: ProjectionRuntime, name: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every serving table of a projection, sorted, keyed by base table name."""
    with runtime.reading(name) as (conn, tables):
        return {
            base: sorted((tuple(row) for row in conn.execute(select(table))), key=repr)
            for base, table in sorted(tables.items())
        }


def checksum(contents: dict[str, list[tuple[Any, ...]]]) -> str:
    """A digest of a projection's sorted rows."""
    return hashlib.sha256(repr(sorted(contents.items())).encode()).hexdigest()


def utc(value: datetime) -> datetime:
    """A stored moment as an aware UTC datetime (SQLite returns it without a zone)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
