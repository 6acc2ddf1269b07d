"""Random command sequences on one order: the money rules hold and the events replay exactly."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from eventsourcing.domain import Aggregate
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

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
    OrderLedgerError,
    OrderNotFullyPaidError,
    OrderNotShippedError,
    PaymentExceedsTotalError,
    RefundExceedsCapturedError,
)
from domain.money import MAX_AMOUNT
from domain.order import Order, OrderStatus

Errors = set[type[OrderLedgerError]]

SKUS = ["A", "B", "C", "D"]
GOOD_TEXT = ["ok", "DHL", "line one\nline two", *(f"pay-{n}" for n in range(1, 6))]
BAD_TEXT: list[Any] = ["", "  ", "x\x00y", 5, None]


def mostly(good: st.SearchStrategy[Any], bad: list[Any]) -> st.SearchStrategy[Any]:
    """Valid values three times in four, so sequences get far enough to reach every state."""
    return st.one_of(good, good, good, st.sampled_from(bad))


skus = mostly(st.sampled_from(SKUS), ["", None, 7])
quantities = mostly(st.integers(1, 4), [0, -1, 2.0, True, "3"])
prices = mostly(st.integers(0, 1500), [-1, MAX_AMOUNT, 9.99, False])
amounts = mostly(
    st.integers(1, 3) | st.integers(1, 3000), [0, -2, 1.5, True, "10", None, MAX_AMOUNT + 1]
)
references = mostly(st.sampled_from([f"pay-{n}" for n in range(1, 6)]), BAD_TEXT)
texts = mostly(st.sampled_from(GOOD_TEXT), BAD_TEXT)


def near(limit: int) -> st.SearchStrategy[int]:
    """The smallest amount, and amounts at, just below and just above a limit: where rules bite."""
    boundaries = st.sampled_from([1, limit - 1, limit, limit + 1])
    return st.one_of(boundaries, st.integers(1, max(limit, 1)))


placed_lines = st.lists(
    st.tuples(st.sampled_from(SKUS), st.integers(1, 3), st.integers(0, 1000)),
    min_size=1,
    max_size=3,
    unique_by=lambda entry: entry[0],
)


def is_amount(value: object, minimum: int) -> bool:
    return type(value) is int and minimum <= value <= MAX_AMOUNT


def is_quantity(value: object) -> bool:
    return type(value) is int and value >= 1


def is_text(value: object) -> bool:
    return value in GOOD_TEXT


def is_identifier(value: object) -> bool:
    """Identifiers are single-line text."""
    return is_text(value) and "\n" not in str(value)


def is_sku(value: object) -> bool:
    return value in SKUS


class OrderCommands(RuleBasedStateMachine):
    """Sends one order random commands and checks each outcome against a plain model."""

    @initialize(lines=placed_lines)
    def place(self, lines: list[tuple[str, int, int]]) -> None:
        self.order = Order.place(
            customer_id="cust-1",
            currency="EUR",
            lines=[{"sku": s, "quantity": q, "unit_price": p} for s, q, p in lines],
        )
        self.events: list[Aggregate.Event] = list(self.order.collect_events())
        # The model: what the rules say the order holds.
        self.amounts = {sku: quantity * price for sku, quantity, price in lines}
        self.captured = 0
        self.refunded = 0
        self.references: set[str] = set()
        self.shipped = False
        self.delivered = False
        self.cancelled = False

    @property
    def total(self) -> int:
        return sum(self.amounts.values())

    @property
    def expected_status(self) -> str:
        if self.cancelled:
            return OrderStatus.CANCELLED
        if self.delivered:
            return OrderStatus.DELIVERED
        if self.shipped:
            return OrderStatus.SHIPPED
        if self.captured >= self.total:
            return OrderStatus.PAID
        return OrderStatus.PARTIALLY_PAID if self.captured else OrderStatus.PENDING_PAYMENT

    def run(self, command: Callable[[], object], rejections: Errors) -> bool:
        """Run the command; it must be rejected exactly when the model names a broken rule."""
        before = self.order.snapshot()
        try:
            command()
        except OrderLedgerError as error:
            assert rejections, f"a valid command was rejected: {error!r}"
            assert type(error) in rejections, f"{error!r} is not one of {rejections}"
            assert str(error)
            assert self.order.collect_events() == []
            assert self.order.snapshot() == before
            return False
        assert not rejections, f"the command should have failed with one of {rejections}"
        new_events = self.order.collect_events()
        assert len(new_events) == 1
        self.events.extend(new_events)
        return True

    @rule(sku=skus, quantity=quantities, price=prices)
    def add_line(self, sku: Any, quantity: Any, price: Any) -> None:
        rejections: Errors = set()
        if not is_sku(sku):
            rejections.add(InvalidCommandError)
        if not is_quantity(quantity) or not is_amount(price, 0):
            rejections.add(InvalidAmountError)
        if self.cancelled or self.shipped or self.captured > 0:
            rejections.add(LinesLockedError)
        if sku in self.amounts:
            rejections.add(DuplicateLineError)
        if (
            is_quantity(quantity)
            and is_amount(price, 0)
            and self.total + quantity * price > MAX_AMOUNT
        ):
            rejections.add(InvalidAmountError)
        command = partial(self.order.add_line, sku=sku, quantity=quantity, unit_price=price)
        if self.run(command, rejections):
            self.amounts[sku] = quantity * price

    @rule(sku=skus)
    def remove_line(self, sku: Any) -> None:
        rejections: Errors = set()
        if not is_sku(sku):
            rejections.add(InvalidCommandError)
        if self.cancelled or self.shipped or self.captured > 0:
            rejections.add(LinesLockedError)
        if sku not in self.amounts:
            rejections.add(LineNotFoundError)
        elif len(self.amounts) == 1:
            rejections.add(LastLineRemovalError)
        if self.run(partial(self.order.remove_line, sku=sku), rejections):
            del self.amounts[sku]

    @rule(amount=amounts, reference=references)
    def capture_payment(self, amount: Any, reference: Any) -> None:
        rejections: Errors = set()
        if not is_amount(amount, 1):
            rejections.add(InvalidAmountError)
        elif self.captured + amount > self.total:
            rejections.add(PaymentExceedsTotalError)
        if not is_text(reference):
            rejections.add(InvalidCommandError)
        if self.cancelled:
            rejections.add(OrderCancelledError)
        if reference in self.references:
            rejections.add(DuplicatePaymentReferenceError)
        command = partial(self.order.capture_payment, amount=amount, payment_reference=reference)
        if self.run(command, rejections):
            self.captured += amount
            self.references.add(reference)

    @rule(data=st.data(), reference=references)
    def capture_near_the_balance(self, data: st.DataObject, reference: Any) -> None:
        """Random amounts rarely hit the balance; this pays it off, part of it or one too much."""
        balance = self.total - self.captured
        self.capture_payment(data.draw(near(balance)), reference)

    @rule(carrier=texts, tracking_number=texts)
    def ship(self, carrier: Any, tracking_number: Any) -> None:
        rejections: Errors = set()
        if not is_identifier(carrier) or not is_identifier(tracking_number):
            rejections.add(InvalidCommandError)
        if self.cancelled:
            rejections.add(OrderCancelledError)
        if self.shipped:
            rejections.add(OrderAlreadyShippedError)
        if self.captured < self.total:
            rejections.add(OrderNotFullyPaidError)
        command = partial(self.order.ship, carrier=carrier, tracking_number=tracking_number)
        if self.run(command, rejections):
            self.shipped = True

    @rule()
    def ship_with_valid_details(self) -> None:
        """Another way to ship, so random sequences reach delivery more often."""
        self.ship("DHL", "pay-1")

    @rule()
    def deliver(self) -> None:
        rejections: Errors = set()
        if self.delivered:
            rejections.add(OrderAlreadyDeliveredError)
        if not self.shipped:
            rejections.add(OrderNotShippedError)
        if self.run(self.order.deliver, rejections):
            self.delivered = True

    @rule(reason=texts)
    def cancel(self, reason: Any) -> None:
        rejections: Errors = set()
        if not is_text(reason):
            rejections.add(InvalidCommandError)
        if self.cancelled:
            rejections.add(OrderCancelledError)
        if self.shipped:
            rejections.add(OrderAlreadyShippedError)
        if self.run(partial(self.order.cancel, reason=reason), rejections):
            self.cancelled = True

    @rule(amount=amounts, reason=texts)
    def issue_refund(self, amount: Any, reason: Any) -> None:
        rejections: Errors = set()
        if not is_amount(amount, 1):
            rejections.add(InvalidAmountError)
        elif amount > self.captured - self.refunded:
            rejections.add(RefundExceedsCapturedError)
        if not is_text(reason):
            rejections.add(InvalidCommandError)
        if self.run(partial(self.order.issue_refund, amount=amount, reason=reason), rejections):
            self.refunded += amount

    @rule(data=st.data(), reason=texts)
    def refund_near_the_limit(self, data: st.DataObject, reason: Any) -> None:
        """Refund all, part or one more than what is left to refund."""
        self.issue_refund(data.draw(near(self.captured - self.refunded)), reason)

    @invariant()
    def money_stays_within_bounds(self) -> None:
        order = self.order
        assert 0 <= order.captured <= order.total <= MAX_AMOUNT
        assert 0 <= order.refunded <= order.captured
        assert order.balance_due >= 0
        assert order.refund_due >= 0
        assert order.refund_due == (order.captured - order.refunded if self.cancelled else 0)
        assert order.balance_due == (0 if self.cancelled else order.total - order.captured)
        assert len(order.lines) >= 1

    @invariant()
    def the_order_matches_the_model(self) -> None:
        order = self.order
        assert {sku: line.amount for sku, line in order.lines.items()} == self.amounts
        assert (order.captured, order.refunded) == (self.captured, self.refunded)
        assert set(order.payment_references) == self.references
        assert order.is_shipped == self.shipped
        assert (order.delivered_at is not None) == self.delivered
        assert order.is_cancelled == self.cancelled
        assert order.status == self.expected_status
        assert order.version == len(self.events)

    @invariant()
    def replaying_the_events_rebuilds_the_same_snapshot(self) -> None:
        rebuilt: Order | None = None
        for domain_event in self.events:
            rebuilt = domain_event.mutate(rebuilt)
        assert isinstance(rebuilt, Order)
        assert rebuilt.snapshot() == self.order.snapshot()


OrderCommands.TestCase.settings = settings(
    max_examples=200, stateful_step_count=20, deadline=None, database=None
)
TestRandomCommandSequencesKeepTheOrderRules = OrderCommands.TestCase
