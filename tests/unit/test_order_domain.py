"""The Order aggregate's rules, read as given(events) / when(command) / then(events or error)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from eventsourcing.domain import Aggregate

from domain.errors import (
    DuplicateLineError,
    DuplicatePaymentReferenceError,
    InvalidAmountError,
    InvalidCommandError,
    InvalidCurrencyError,
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
from domain.order import (
    EVENT_TYPES,
    MAX_ADDRESS_LENGTH,
    MAX_ID_LENGTH,
    MAX_LINES,
    MAX_QUANTITY,
    MAX_REASON_LENGTH,
    MAX_REFERENCE_LENGTH,
    Order,
    OrderStatus,
)

Command = Callable[[Order], object]

BOOK = {"sku": "BOOK-1", "quantity": 2, "unit_price": 1500}
PEN = {"sku": "PEN-7", "quantity": 1, "unit_price": 300}
TOTAL = 2 * 1500 + 300

# -- given / when / then ----------------------------------------------------------------------


def placed(**overrides: Any) -> dict[str, Any]:
    """Arguments for Order.place: a two-line EUR order unless overridden."""
    return {"customer_id": "cust-42", "currency": "EUR", "lines": [BOOK, PEN], **overrides}


def history(*commands: Command, **place: Any) -> list[Aggregate.Event]:
    """The events one order records when placed and then sent the commands, in order."""
    order = Order.place(**placed(**place))
    for command in commands:
        command(order)
    return list(order.collect_events())


def given(*events: Aggregate.Event) -> Order:
    """Rebuild an order from its events, the way the repository does: no pending events."""
    aggregate: Order | None = None
    for domain_event in events:
        aggregate = domain_event.mutate(aggregate)
    assert isinstance(aggregate, Order)
    return aggregate


@dataclass
class Outcome:
    """What one command did to an order rebuilt from its history."""

    prior: list[Aggregate.Event]
    order: Order
    before: dict[str, Any]
    new_events: list[Aggregate.Event]
    error: Exception | None

    def then(self, *expected: tuple[type[Aggregate.Event], dict[str, Any]]) -> Order:
        """Assert the command recorded exactly these events, with these attribute values."""
        assert self.error is None, f"command was rejected: {self.error!r}"
        assert len(self.new_events) == len(expected), self.new_events
        for recorded, (event_class, attributes) in zip(self.new_events, expected, strict=True):
            assert isinstance(recorded, event_class), recorded
            assert recorded.originator_id == self.order.id
            for name, value in attributes.items():
                assert getattr(recorded, name) == value, name
        assert self.order.version == self.before["version"] + len(expected)
        # The recorded events rebuild exactly the state the command left behind.
        assert given(*self.prior, *self.new_events).snapshot() == self.order.snapshot()
        return self.order

    def then_rejected(self, error_class: type[OrderLedgerError], match: str) -> None:
        """Assert the command raised exactly this error, saying why, and recorded nothing."""
        assert type(self.error) is error_class, repr(self.error)
        assert match in str(self.error), str(self.error)
        assert self.new_events == []
        assert self.order.snapshot() == self.before


def when(events: list[Aggregate.Event], command: Command) -> Outcome:
    """Rebuild an order from its events, run one command, and capture what it did."""
    order = given(*events)
    before = order.snapshot()
    error: Exception | None = None
    # Any exception is caught so then() and then_rejected() can say which was expected.
    try:
        command(order)
    except Exception as raised:
        error = raised
    return Outcome(events, order, before, list(order.collect_events()), error)


# -- commands -----------------------------------------------------------------------------------


def add(sku: Any = "MUG-3", quantity: Any = 1, unit_price: Any = 800) -> Command:
    return lambda order: order.add_line(sku=sku, quantity=quantity, unit_price=unit_price)


def remove(sku: Any) -> Command:
    return lambda order: order.remove_line(sku=sku)


def pay(amount: Any = TOTAL, reference: Any = "pay-1") -> Command:
    return lambda order: order.capture_payment(amount=amount, payment_reference=reference)


def ship(carrier: Any = "DHL", tracking_number: Any = "JD0001") -> Command:
    return lambda order: order.ship(carrier=carrier, tracking_number=tracking_number)


def deliver() -> Command:
    return lambda order: order.deliver()


def cancel(reason: Any = "customer changed their mind") -> Command:
    return lambda order: order.cancel(reason=reason)


def refund(amount: Any, reason: Any = "goodwill") -> Command:
    return lambda order: order.issue_refund(amount=amount, reason=reason)


def rejected_placing(error_class: type[OrderLedgerError], match: str, **arguments: Any) -> None:
    """Assert Order.place refuses these arguments with this error, saying why."""
    with pytest.raises(OrderLedgerError) as caught:
        Order.place(**placed(**arguments))
    assert type(caught.value) is error_class, repr(caught.value)
    assert match in str(caught.value), str(caught.value)


def line(**overrides: Any) -> dict[str, Any]:
    return {**BOOK, **overrides}


# Text fields that must be non-blank, bounded and free of control characters.
BAD_TEXT = [
    pytest.param("", "must not be blank", id="empty"),
    pytest.param("   ", "must not be blank", id="blank"),
    pytest.param(42, "must be a string", id="not-a-string"),
    pytest.param(None, "must be a string", id="none"),
    pytest.param("a\x00b", "control characters", id="nul"),
    pytest.param("a\x1bb", "control characters", id="escape"),
    pytest.param("a\x7fb", "control characters", id="delete"),
    pytest.param("a\x85b", "control characters", id="c1-next-line"),
    pytest.param("a\ud800b", "unpaired surrogates", id="lone-surrogate"),
]
# Identifiers are single-line as well.
BAD_IDENTIFIER = [
    *BAD_TEXT,
    pytest.param("a\nb", "control characters", id="newline"),
    pytest.param("a\tb", "control characters", id="tab"),
]
BAD_AMOUNT = [
    pytest.param(1.0, "must be an integer", id="float"),
    pytest.param(Decimal(100), "must be an integer", id="decimal"),
    pytest.param(True, "must be an integer", id="bool"),
    pytest.param("100", "must be an integer", id="string"),
    pytest.param(None, "must be an integer", id="none"),
    pytest.param(0, "must be between 1", id="zero"),
    pytest.param(-1, "must be between 1", id="negative"),
    pytest.param(MAX_AMOUNT + 1, "must be between 1", id="above-int64"),
]


# -- placing ------------------------------------------------------------------------------------


class TestPlacing:
    def test_placing_an_order_records_placed_with_customer_currency_and_lines(self) -> None:
        """Placing records one Placed event carrying every validated part of the order."""
        order = Order.place(
            **placed(shipping_address="1 Main St\nSpringfield", client_reference="web-123")
        )
        (recorded,) = order.collect_events()
        assert isinstance(recorded, Order.Placed)
        assert recorded.customer_id == "cust-42"
        assert recorded.currency == "EUR"
        assert recorded.lines == [BOOK, PEN]
        assert recorded.shipping_address == "1 Main St\nSpringfield"
        assert recorded.client_reference == "web-123"
        assert order.version == 1

    def test_a_placed_order_awaits_payment_of_its_total(self) -> None:
        """A new order is pending payment, owes its whole total and has nothing to refund."""
        order = given(*history())
        assert order.total == TOTAL
        assert order.status == OrderStatus.PENDING_PAYMENT
        assert order.balance_due == TOTAL
        assert order.refund_due == 0
        assert order.captured == order.refunded == 0

    def test_shipping_address_and_client_reference_are_optional(self) -> None:
        """Without them the order records None for both."""
        (recorded,) = history()
        assert isinstance(recorded, Order.Placed)
        assert recorded.shipping_address is None
        assert recorded.client_reference is None

    def test_placed_events_are_class_version_3(self) -> None:
        """Placed gained client_reference (v2) and customer_email (v3); the rest are still v1."""
        assert Order.Placed.class_version == 3
        others = [cls for cls in EVENT_TYPES.values() if cls is not Order.Placed]
        assert all(getattr(cls, "class_version", 1) == 1 for cls in others)

    def test_boundary_values_are_accepted(self) -> None:
        """The largest quantity, a zero price, maximal text and a total of exactly int64 pass."""
        order = Order.place(
            customer_id="c" * MAX_ID_LENGTH,
            currency="JPY",
            lines=[
                {"sku": "s" * MAX_ID_LENGTH, "quantity": MAX_QUANTITY, "unit_price": 0},
                {"sku": "BIG", "quantity": 1, "unit_price": MAX_AMOUNT},
            ],
            shipping_address="a" * MAX_ADDRESS_LENGTH,
            client_reference="r" * MAX_REFERENCE_LENGTH,
        )
        assert order.total == MAX_AMOUNT

    def test_an_order_may_have_the_maximum_number_of_lines(self) -> None:
        """Exactly MAX_LINES distinct lines is allowed."""
        lines = [line(sku=f"SKU-{i}") for i in range(MAX_LINES)]
        assert len(Order.place(**placed(lines=lines)).lines) == MAX_LINES

    @pytest.mark.parametrize(("value", "match"), BAD_IDENTIFIER)
    def test_a_malformed_customer_id_is_rejected(self, value: Any, match: str) -> None:
        """customer_id must be a non-blank single-line string."""
        rejected_placing(InvalidCommandError, match, customer_id=value)

    def test_an_oversized_customer_id_is_rejected(self) -> None:
        """customer_id is bounded."""
        rejected_placing(
            InvalidCommandError,
            f"at most {MAX_ID_LENGTH} characters",
            customer_id="c" * (MAX_ID_LENGTH + 1),
        )

    @pytest.mark.parametrize("currency", ["XYZ", "eur", "EURO", "", None, 978, ["EUR"]])
    def test_a_currency_that_is_not_iso_4217_is_rejected(self, currency: Any) -> None:
        """Only active ISO 4217 codes, spelled in capitals, are currencies."""
        rejected_placing(InvalidCurrencyError, "not an ISO 4217 currency", currency=currency)

    def test_an_order_without_lines_is_rejected(self) -> None:
        """An order never has zero lines."""
        rejected_placing(InvalidCommandError, "at least one line", lines=[])

    @pytest.mark.parametrize("lines", [None, "BOOK-1", BOOK, 3])
    def test_lines_that_are_not_a_list_are_rejected(self, lines: Any) -> None:
        """Lines must be a list of line mappings."""
        rejected_placing(InvalidCommandError, "must be a list of lines", lines=lines)

    @pytest.mark.parametrize("entry", [None, "BOOK-1", ["BOOK-1", 1, 100]])
    def test_a_line_that_is_not_a_mapping_is_rejected(self, entry: Any) -> None:
        """Each line must be a mapping of sku, quantity and unit_price."""
        rejected_placing(InvalidCommandError, "each line must have", lines=[BOOK, entry])

    @pytest.mark.parametrize(("value", "match"), BAD_IDENTIFIER)
    def test_a_malformed_sku_is_rejected(self, value: Any, match: str) -> None:
        """A SKU must be a non-blank single-line string."""
        rejected_placing(InvalidCommandError, match, lines=[line(sku=value)])

    def test_an_oversized_sku_is_rejected(self) -> None:
        """A SKU is bounded."""
        sku = "s" * (MAX_ID_LENGTH + 1)
        rejected_placing(InvalidCommandError, "at most", lines=[line(sku=sku)])

    @pytest.mark.parametrize(
        ("quantity", "match"),
        [
            (0, "between 1 and"),
            (-3, "between 1 and"),
            (MAX_QUANTITY + 1, "between 1 and"),
            (2.0, "must be an integer"),
            (True, "must be an integer"),
            ("2", "must be an integer"),
            (None, "must be an integer"),
        ],
    )
    def test_a_quantity_out_of_bounds_is_rejected(self, quantity: Any, match: str) -> None:
        """Quantity is an integer from 1 to MAX_QUANTITY (never a bool or float)."""
        rejected_placing(InvalidAmountError, match, lines=[line(quantity=quantity)])

    @pytest.mark.parametrize(
        ("price", "match"),
        [
            (-1, "between 0 and"),
            (MAX_AMOUNT + 1, "between 0 and"),
            (15.0, "must be an integer number of minor units"),
            (Decimal("15.00"), "must be an integer number of minor units"),
            (False, "must be an integer number of minor units"),
            ("1500", "must be an integer number of minor units"),
        ],
    )
    def test_a_unit_price_that_is_not_non_negative_minor_units_is_rejected(
        self, price: Any, match: str
    ) -> None:
        """A unit price is a non-negative integer of minor units that fits int64."""
        rejected_placing(InvalidAmountError, match, lines=[line(unit_price=price)])

    def test_the_same_sku_on_two_lines_is_rejected(self) -> None:
        """Each SKU appears on one line only."""
        rejected_placing(
            DuplicateLineError,
            "appears on more than one line",
            lines=[BOOK, PEN, line(quantity=1)],
        )

    def test_more_than_the_maximum_number_of_lines_is_rejected(self) -> None:
        """An order has at most MAX_LINES lines."""
        lines = [line(sku=f"SKU-{i}") for i in range(MAX_LINES + 1)]
        rejected_placing(InvalidCommandError, f"at most {MAX_LINES} lines", lines=lines)

    def test_an_endless_stream_of_lines_is_refused_at_the_limit(self) -> None:
        """Placing stops reading lines once there is one too many."""
        endless: Iterator[dict[str, Any]] = (line(sku=f"SKU-{i}") for i in itertools.count())
        rejected_placing(InvalidCommandError, f"at most {MAX_LINES} lines", lines=endless)
        assert next(endless)["sku"] == f"SKU-{MAX_LINES + 1}"

    def test_a_total_above_the_largest_order_total_is_rejected(self) -> None:
        """The order total is at most MAX_AMOUNT, so read-model sums cannot overflow."""
        lines = [line(sku="A", quantity=1, unit_price=MAX_AMOUNT), line(sku="B", quantity=1)]
        rejected_placing(InvalidAmountError, "exceeds the largest order total", lines=lines)

    def test_a_line_whose_amount_alone_exceeds_the_largest_total_is_rejected(self) -> None:
        """Quantity times price may exceed the largest total even when each fits."""
        big = line(quantity=2, unit_price=MAX_AMOUNT // 2 + 1)
        rejected_placing(InvalidAmountError, "exceeds the largest order total", lines=[big])

    @pytest.mark.parametrize(("value", "match"), [p for p in BAD_TEXT if p.id != "none"])
    def test_a_malformed_shipping_address_is_rejected(self, value: Any, match: str) -> None:
        """The shipping address is optional, but when given it must be printable text."""
        rejected_placing(InvalidCommandError, match, shipping_address=value)

    def test_an_oversized_shipping_address_is_rejected(self) -> None:
        """The shipping address is bounded."""
        rejected_placing(
            InvalidCommandError,
            f"at most {MAX_ADDRESS_LENGTH} characters",
            shipping_address="a" * (MAX_ADDRESS_LENGTH + 1),
        )

    @pytest.mark.parametrize(("value", "match"), [p for p in BAD_IDENTIFIER if p.id != "none"])
    def test_a_malformed_client_reference_is_rejected(self, value: Any, match: str) -> None:
        """The client reference is optional, but when given it must be a single-line string."""
        rejected_placing(InvalidCommandError, match, client_reference=value)

    def test_an_oversized_client_reference_is_rejected(self) -> None:
        """The client reference is bounded."""
        rejected_placing(
            InvalidCommandError,
            f"at most {MAX_REFERENCE_LENGTH} characters",
            client_reference="r" * (MAX_REFERENCE_LENGTH + 1),
        )


# -- adding and removing lines ------------------------------------------------------------------


class TestAddingLines:
    def test_adding_a_line_records_line_added_and_raises_the_total(self) -> None:
        """A new SKU joins the order while nothing is captured."""
        order = when(history(), add("MUG-3", 3, 800)).then(
            (Order.LineAdded, {"sku": "MUG-3", "quantity": 3, "unit_price": 800})
        )
        assert order.total == TOTAL + 2400
        assert order.balance_due == TOTAL + 2400
        assert [entry["sku"] for entry in order.snapshot()["lines"]] == ["BOOK-1", "PEN-7", "MUG-3"]

    def test_a_removed_sku_can_be_added_again(self) -> None:
        """Removing a line frees its SKU."""
        events = history(remove("PEN-7"))
        when(events, add("PEN-7", 5, 300)).then(
            (Order.LineAdded, {"sku": "PEN-7", "quantity": 5, "unit_price": 300})
        )

    def test_adding_a_line_after_a_payment_is_rejected(self) -> None:
        """Lines are locked once money has been captured."""
        events = history(pay(100))
        when(events, add()).then_rejected(LinesLockedError, "once a payment has been captured")

    def test_adding_a_line_to_a_cancelled_order_is_rejected(self) -> None:
        """A cancelled order's lines never change."""
        events = history(cancel())
        when(events, add()).then_rejected(LinesLockedError, "cancelled order")

    def test_adding_a_line_to_a_shipped_order_is_rejected(self) -> None:
        """A shipped order's lines never change."""
        events = history(pay(), ship())
        when(events, add()).then_rejected(LinesLockedError, "shipped order")

    def test_adding_a_sku_already_on_the_order_is_rejected(self) -> None:
        """Each SKU appears on one line only."""
        events = history()
        when(events, add("BOOK-1")).then_rejected(DuplicateLineError, "already has a line")

    def test_adding_a_line_beyond_the_maximum_is_rejected(self) -> None:
        """An order has at most MAX_LINES lines."""
        events = history(lines=[line(sku=f"SKU-{i}") for i in range(MAX_LINES)])
        when(events, add()).then_rejected(InvalidCommandError, f"at most {MAX_LINES} lines")

    def test_adding_a_line_that_takes_the_total_above_the_largest_is_rejected(self) -> None:
        """The order total is at most MAX_AMOUNT, so read-model sums cannot overflow."""
        events = history()
        when(events, add(unit_price=MAX_AMOUNT)).then_rejected(
            InvalidAmountError, "would exceed the largest order total"
        )

    @pytest.mark.parametrize(
        ("command", "error", "match"),
        [
            (add(quantity=0), InvalidAmountError, "between 1 and"),
            (add(quantity=1.5), InvalidAmountError, "must be an integer"),
            (add(quantity=True), InvalidAmountError, "must be an integer"),
            (add(unit_price=-5), InvalidAmountError, "between 0 and"),
            (add(unit_price=8.0), InvalidAmountError, "must be an integer"),
            (add(sku=" "), InvalidCommandError, "must not be blank"),
            (add(sku="x" * (MAX_ID_LENGTH + 1)), InvalidCommandError, "at most"),
            (add(sku="MUG\r3"), InvalidCommandError, "control characters"),
        ],
        ids=[
            "zero-quantity",
            "float-quantity",
            "bool-quantity",
            "negative-price",
            "float-price",
            "blank-sku",
            "oversized-sku",
            "control-in-sku",
        ],
    )
    def test_adding_a_malformed_line_is_rejected(
        self, command: Command, error: type[OrderLedgerError], match: str
    ) -> None:
        """A new line obeys the same bounds as the lines an order is placed with."""
        when(history(), command).then_rejected(error, match)


class TestRemovingLines:
    def test_removing_a_line_records_line_removed_and_lowers_the_total(self) -> None:
        """A line goes while another remains and nothing is captured."""
        order = when(history(), remove("PEN-7")).then((Order.LineRemoved, {"sku": "PEN-7"}))
        assert order.total == 3000
        assert list(order.lines) == ["BOOK-1"]

    def test_removing_the_last_line_is_rejected(self) -> None:
        """An order never has zero lines."""
        events = history(remove("PEN-7"))
        when(events, remove("BOOK-1")).then_rejected(LastLineRemovalError, "at least one line")

    def test_removing_a_sku_not_on_the_order_is_rejected(self) -> None:
        """Only lines on the order can be removed."""
        when(history(), remove("NOPE")).then_rejected(LineNotFoundError, "no line for SKU")

    def test_removing_a_line_after_a_payment_is_rejected(self) -> None:
        """Lines are locked once money has been captured."""
        events = history(pay(1))
        when(events, remove("PEN-7")).then_rejected(LinesLockedError, "payment has been captured")

    def test_removing_a_line_from_a_cancelled_order_is_rejected(self) -> None:
        """A cancelled order's lines never change."""
        events = history(cancel())
        when(events, remove("PEN-7")).then_rejected(LinesLockedError, "cancelled order")

    @pytest.mark.parametrize(("sku", "match"), BAD_IDENTIFIER[:4])
    def test_removing_a_malformed_sku_is_rejected(self, sku: Any, match: str) -> None:
        """The SKU to remove is validated like any other."""
        when(history(), remove(sku)).then_rejected(InvalidCommandError, match)


# -- payments -----------------------------------------------------------------------------------


class TestCapturingPayments:
    def test_capturing_part_of_the_total_leaves_the_order_partially_paid(self) -> None:
        """A partial capture records PaymentCaptured and lowers the balance due."""
        order = when(history(), pay(1000, "pay-1")).then(
            (Order.PaymentCaptured, {"amount": 1000, "payment_reference": "pay-1"})
        )
        assert order.status == OrderStatus.PARTIALLY_PAID
        assert order.captured == 1000
        assert order.balance_due == TOTAL - 1000

    def test_capturing_the_rest_of_the_total_pays_the_order(self) -> None:
        """Partial captures add up to a fully paid order."""
        order = when(history(pay(1000, "pay-1")), pay(TOTAL - 1000, "pay-2")).then(
            (Order.PaymentCaptured, {"amount": TOTAL - 1000, "payment_reference": "pay-2"})
        )
        assert order.status == OrderStatus.PAID
        assert order.balance_due == 0
        assert order.payment_references == ["pay-1", "pay-2"]

    def test_capturing_more_than_the_total_is_rejected(self) -> None:
        """Total captured never exceeds the order total."""
        when(history(), pay(TOTAL + 1)).then_rejected(
            PaymentExceedsTotalError, "would exceed the order total"
        )

    def test_capturing_more_than_the_balance_due_is_rejected(self) -> None:
        """After a partial capture only the balance can still be captured."""
        events = history(pay(TOTAL - 10, "pay-1"))
        when(events, pay(11, "pay-2")).then_rejected(PaymentExceedsTotalError, "10 due")

    def test_capturing_on_a_fully_paid_order_is_rejected(self) -> None:
        """Nothing more can be captured once the total is paid."""
        events = history(pay(TOTAL, "pay-1"))
        when(events, pay(1, "pay-2")).then_rejected(PaymentExceedsTotalError, "exceed")

    def test_reusing_a_payment_reference_is_rejected(self) -> None:
        """The same payment reference is never captured twice on an order."""
        events = history(pay(100, "pay-1"))
        when(events, pay(100, "pay-1")).then_rejected(
            DuplicatePaymentReferenceError, "already captured"
        )

    def test_capturing_on_a_cancelled_order_is_rejected(self) -> None:
        """A cancelled order takes no more money."""
        events = history(cancel())
        when(events, pay(100)).then_rejected(OrderCancelledError, "cancelled order")

    @pytest.mark.parametrize(("amount", "match"), BAD_AMOUNT)
    def test_a_malformed_amount_is_rejected(self, amount: Any, match: str) -> None:
        """An amount is a positive integer of minor units that fits int64."""
        when(history(), pay(amount)).then_rejected(InvalidAmountError, match)

    @pytest.mark.parametrize(("reference", "match"), BAD_IDENTIFIER)
    def test_a_malformed_payment_reference_is_rejected(self, reference: Any, match: str) -> None:
        """A payment reference is a non-blank single-line string."""
        when(history(), pay(100, reference)).then_rejected(InvalidCommandError, match)

    def test_an_oversized_payment_reference_is_rejected(self) -> None:
        """A payment reference is bounded."""
        reference = "p" * (MAX_REFERENCE_LENGTH + 1)
        when(history(), pay(100, reference)).then_rejected(InvalidCommandError, "at most")


# -- shipping and delivery ----------------------------------------------------------------------


class TestShipping:
    def test_shipping_a_fully_paid_order_records_carrier_and_tracking(self) -> None:
        """A paid order ships, stamped with the Shipped event's own time."""
        order = when(history(pay()), ship("DHL", "JD0001")).then(
            (Order.Shipped, {"carrier": "DHL", "tracking_number": "JD0001"})
        )
        assert order.status == OrderStatus.SHIPPED
        assert order.carrier == "DHL"
        assert order.tracking_number == "JD0001"

    def test_shipping_an_unpaid_order_is_rejected(self) -> None:
        """Only a fully paid order ships."""
        when(history(), ship()).then_rejected(OrderNotFullyPaidError, f"{TOTAL} of {TOTAL} due")

    def test_shipping_a_partially_paid_order_is_rejected(self) -> None:
        """A partial capture is not enough to ship."""
        events = history(pay(TOTAL - 1))
        when(events, ship()).then_rejected(OrderNotFullyPaidError, "until fully paid")

    def test_an_order_with_nothing_to_pay_ships_at_once(self) -> None:
        """A zero-total order is fully paid from the start."""
        events = history(lines=[line(unit_price=0)])
        assert given(*events).status == OrderStatus.PAID
        when(events, ship()).then((Order.Shipped, {"carrier": "DHL"}))

    def test_shipping_a_cancelled_order_is_rejected(self) -> None:
        """A cancelled order never ships, even if it was paid first."""
        events = history(pay(), cancel())
        when(events, ship()).then_rejected(OrderCancelledError, "cancelled order")

    def test_shipping_twice_is_rejected(self) -> None:
        """An order ships once."""
        events = history(pay(), ship())
        when(events, ship("UPS", "1Z")).then_rejected(OrderAlreadyShippedError, "already shipped")

    @pytest.mark.parametrize(
        ("command", "match"),
        [
            (ship(carrier=""), "carrier must not be blank"),
            (ship(carrier="c" * (MAX_ID_LENGTH + 1)), "carrier must be at most"),
            (ship(tracking_number=" "), "tracking_number must not be blank"),
            (ship(tracking_number="t" * (MAX_REFERENCE_LENGTH + 1)), "at most"),
            (ship(tracking_number="JD\n0001"), "control characters"),
            (ship(carrier=7), "carrier must be a string"),
        ],
        ids=[
            "blank-carrier",
            "oversized-carrier",
            "blank-tracking",
            "oversized-tracking",
            "newline-in-tracking",
            "carrier-not-a-string",
        ],
    )
    def test_malformed_carrier_or_tracking_number_is_rejected(
        self, command: Command, match: str
    ) -> None:
        """Carrier and tracking number are bounded single-line strings."""
        when(history(pay()), command).then_rejected(InvalidCommandError, match)


class TestDelivering:
    def test_delivering_a_shipped_order_records_delivered(self) -> None:
        """A shipped order is delivered."""
        order = when(history(pay(), ship()), deliver()).then((Order.Delivered, {}))
        assert order.status == OrderStatus.DELIVERED

    def test_delivering_an_order_that_has_not_shipped_is_rejected(self) -> None:
        """Delivery only follows shipment."""
        when(history(pay()), deliver()).then_rejected(OrderNotShippedError, "before it ships")

    def test_delivering_a_cancelled_order_is_rejected(self) -> None:
        """A cancelled order never ships, so it is never delivered."""
        when(history(cancel()), deliver()).then_rejected(OrderNotShippedError, "before it ships")

    def test_delivering_twice_is_rejected(self) -> None:
        """An order is delivered once."""
        events = history(pay(), ship(), deliver())
        when(events, deliver()).then_rejected(OrderAlreadyDeliveredError, "already been delivered")


class TestMomentsComeFromTheirOwnEvents:
    @pytest.mark.parametrize(
        ("commands", "attribute"),
        [
            ((pay(), ship()), "shipped_at"),
            ((pay(), ship(), deliver()), "delivered_at"),
            ((pay(), cancel()), "cancelled_at"),
        ],
    )
    def test_a_moment_is_the_timestamp_of_the_event_that_made_it(
        self, commands: tuple[Command, ...], attribute: str
    ) -> None:
        """shipped_at, delivered_at and cancelled_at are their events' times, not the previous."""
        *earlier, last = history(*commands)
        # An hour after the event before it, so the two moments cannot coincide.
        last = dataclasses.replace(last, timestamp=earlier[-1].timestamp + timedelta(hours=1))
        order = given(*earlier, last)
        assert getattr(order, attribute) == last.timestamp
        assert order.snapshot()[attribute] == last.timestamp.isoformat()


# -- cancelling and refunds ---------------------------------------------------------------------


class TestCancelling:
    def test_cancelling_an_unpaid_order_records_cancelled_with_its_reason(self) -> None:
        """An unpaid order can be cancelled; it then owes and is owed nothing."""
        order = when(history(), cancel("out of stock")).then(
            (Order.Cancelled, {"reason": "out of stock"})
        )
        assert order.status == OrderStatus.CANCELLED
        assert order.cancellation_reason == "out of stock"
        assert order.balance_due == 0
        assert order.refund_due == 0

    def test_cancelling_after_a_partial_capture_shows_the_captured_money_as_refund_due(
        self,
    ) -> None:
        """A cancelled order with money captured owes that money back."""
        order = when(history(pay(1200)), cancel()).then((Order.Cancelled, {}))
        assert order.refund_due == 1200
        assert order.balance_due == 0

    def test_cancelling_a_paid_order_before_shipment_is_allowed(self) -> None:
        """Cancellation is possible up to the moment of shipment."""
        order = when(history(pay()), cancel()).then((Order.Cancelled, {}))
        assert order.refund_due == TOTAL

    def test_a_reason_may_span_lines(self) -> None:
        """Reasons are free text: newlines and tabs are kept."""
        when(history(), cancel("line one\n\tline two")).then(
            (Order.Cancelled, {"reason": "line one\n\tline two"})
        )

    def test_cancelling_a_shipped_order_is_rejected(self) -> None:
        """Cancellation is only possible before shipment."""
        events = history(pay(), ship())
        when(events, cancel()).then_rejected(OrderAlreadyShippedError, "shipped order")

    def test_cancelling_a_delivered_order_is_rejected(self) -> None:
        """A delivered order has shipped, so it cannot be cancelled."""
        events = history(pay(), ship(), deliver())
        when(events, cancel()).then_rejected(OrderAlreadyShippedError, "shipped order")

    def test_cancelling_twice_is_rejected(self) -> None:
        """An order is cancelled once."""
        when(history(cancel()), cancel()).then_rejected(OrderCancelledError, "already cancelled")

    @pytest.mark.parametrize(("reason", "match"), BAD_TEXT)
    def test_a_malformed_reason_is_rejected(self, reason: Any, match: str) -> None:
        """A reason is non-blank printable text."""
        when(history(), cancel(reason)).then_rejected(InvalidCommandError, match)

    def test_an_oversized_reason_is_rejected(self) -> None:
        """A reason is bounded."""
        reason = "r" * (MAX_REASON_LENGTH + 1)
        when(history(), cancel(reason)).then_rejected(InvalidCommandError, "at most")


class TestRefunding:
    def test_refunding_a_cancelled_order_records_refund_issued_and_lowers_refund_due(
        self,
    ) -> None:
        """A refund gives back part of what was captured."""
        order = when(history(pay(1200), cancel()), refund(500, "cancelled")).then(
            (Order.RefundIssued, {"amount": 500, "reason": "cancelled"})
        )
        assert order.refunded == 500
        assert order.refund_due == 700

    def test_refunding_everything_captured_settles_a_cancelled_order(self) -> None:
        """Refunds add up until nothing is due."""
        events = history(pay(1200), cancel(), refund(500))
        order = when(events, refund(700)).then((Order.RefundIssued, {"amount": 700}))
        assert order.refund_due == 0
        assert order.refunded == order.captured == 1200

    def test_a_delivered_order_can_be_refunded_up_to_what_was_captured(self) -> None:
        """Refunds are not only for cancelled orders (returns, goodwill)."""
        order = when(history(pay(), ship(), deliver()), refund(TOTAL)).then(
            (Order.RefundIssued, {"amount": TOTAL})
        )
        assert order.refunded == TOTAL
        assert order.refund_due == 0
        assert order.status == OrderStatus.DELIVERED

    def test_refunding_more_than_captured_is_rejected(self) -> None:
        """A refund never exceeds what was captured."""
        events = history(pay(1200), cancel())
        when(events, refund(1201)).then_rejected(RefundExceedsCapturedError, "refundable 1200")

    def test_refunding_more_than_what_is_left_after_earlier_refunds_is_rejected(self) -> None:
        """Refunds together never exceed captured minus already refunded."""
        events = history(pay(1200), cancel(), refund(1000))
        when(events, refund(201)).then_rejected(RefundExceedsCapturedError, "refundable 200")

    def test_refunding_an_order_with_nothing_captured_is_rejected(self) -> None:
        """There is nothing to give back before a capture."""
        when(history(cancel()), refund(1)).then_rejected(RefundExceedsCapturedError, "refundable 0")

    @pytest.mark.parametrize(("amount", "match"), BAD_AMOUNT)
    def test_a_malformed_refund_amount_is_rejected(self, amount: Any, match: str) -> None:
        """A refund amount is a positive integer of minor units."""
        events = history(pay(), cancel())
        when(events, refund(amount)).then_rejected(InvalidAmountError, match)

    @pytest.mark.parametrize(("reason", "match"), BAD_TEXT)
    def test_a_malformed_refund_reason_is_rejected(self, reason: Any, match: str) -> None:
        """A refund reason is non-blank printable text."""
        events = history(pay(), cancel())
        when(events, refund(100, reason)).then_rejected(InvalidCommandError, match)


# -- derived state ------------------------------------------------------------------------------


class TestSnapshot:
    def test_snapshot_reports_the_whole_state_as_plain_data(self) -> None:
        """snapshot() lists every field the audit and the API read."""
        events = history(
            add("MUG-3", 1, 700),
            pay(2000, "pay-1"),
            cancel("fraud check"),
            refund(500, "partial"),
            shipping_address="1 Main St",
            client_reference="web-9",
        )
        order = given(*events)
        assert order.snapshot() == {
            "order_id": str(events[0].originator_id),
            "version": 5,
            "status": OrderStatus.CANCELLED,
            "customer_id": "cust-42",
            "currency": "EUR",
            "lines": [BOOK, PEN, {"sku": "MUG-3", "quantity": 1, "unit_price": 700}],
            "total": TOTAL + 700,
            "captured": 2000,
            "refunded": 500,
            "balance_due": 0,
            "refund_due": 1500,
            "payment_references": ["pay-1"],
            "shipping_address": "1 Main St",
            "client_reference": "web-9",
            "customer_email": None,
            "carrier": None,
            "tracking_number": None,
            "placed_at": events[0].timestamp.isoformat(),
            "updated_at": events[-1].timestamp.isoformat(),
            "shipped_at": None,
            "delivered_at": None,
            "cancelled_at": events[3].timestamp.isoformat(),
            "cancellation_reason": "fraud check",
        }

    @pytest.mark.parametrize(
        ("commands", "status", "balance_due"),
        [
            ((), OrderStatus.PENDING_PAYMENT, TOTAL),
            ((pay(1),), OrderStatus.PARTIALLY_PAID, TOTAL - 1),
            ((pay(),), OrderStatus.PAID, 0),
            ((pay(), ship()), OrderStatus.SHIPPED, 0),
            ((pay(), ship(), deliver()), OrderStatus.DELIVERED, 0),
            ((pay(1), cancel()), OrderStatus.CANCELLED, 0),
        ],
    )
    def test_status_and_balance_follow_the_events(
        self, commands: tuple[Command, ...], status: str, balance_due: int
    ) -> None:
        """Each point in the lifecycle has one status and balance."""
        order = given(*history(*commands))
        assert order.status == status
        assert order.balance_due == balance_due
        assert status in OrderStatus.ALL

    def test_replaying_the_events_rebuilds_the_same_order(self) -> None:
        """The order built by commands and the order rebuilt from its events are equal."""
        order = Order.place(**placed())
        for command in (remove("PEN-7"), pay(1000, "a"), pay(2000, "b"), ship(), deliver()):
            command(order)
        events = order.collect_events()
        assert given(*events).snapshot() == order.snapshot()

    def test_every_event_class_has_a_stable_public_name(self) -> None:
        """EVENT_TYPES names each of the order's event classes once."""
        assert set(EVENT_TYPES.values()) == {
            Order.Placed,
            Order.LineAdded,
            Order.LineRemoved,
            Order.PaymentCaptured,
            Order.Shipped,
            Order.Delivered,
            Order.Cancelled,
            Order.RefundIssued,
        }
        assert len(EVENT_TYPES) == 8


class TestCustomerEmail:
    def test_an_order_may_carry_the_customer_email(self) -> None:
        """The address given at placement is recorded on Placed and kept on the order."""
        order = Order.place(
            customer_id="c-1",
            currency="EUR",
            lines=[{"sku": "A", "quantity": 1, "unit_price": 100}],
            customer_email="ada@example.com",
        )
        (placed,) = order.collect_events()
        assert isinstance(placed, Order.Placed)
        assert placed.customer_email == "ada@example.com"
        assert order.snapshot()["customer_email"] == "ada@example.com"

    @pytest.mark.parametrize("address", ["ada", "ada@", "@example.com", "a b@example.com", "x@y"])
    def test_a_malformed_email_is_rejected(self, address: str) -> None:
        """Something that is not local@domain.tld is refused with a reason."""
        with pytest.raises(InvalidCommandError, match="customer_email"):
            Order.place(
                customer_id="c-1",
                currency="EUR",
                lines=[{"sku": "A", "quantity": 1, "unit_price": 100}],
                customer_email=address,
            )
