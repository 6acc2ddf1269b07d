"""Orders placed before client_reference existed (Placed v1) still load from a real store."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic

from domain.ledger import OrderLedger
from domain.order import Order, OrderStatus
from tests.support.stores import open_ledger_at

PLACED_AT = datetime(2024, 3, 1, 9, 30, tzinfo=UTC)
V1_LINES = [
    {"sku": "BOOK-1", "quantity": 2, "unit_price": 1500},
    {"sku": "PEN-7", "quantity": 1, "unit_price": 300},
]


@pytest.fixture
def ledger(store_url: str) -> Iterator[OrderLedger]:
    """A ledger on a fresh SQLite file or PostgreSQL database."""
    ledger = open_ledger_at(store_url)
    yield ledger
    ledger.close()


def store_v1_placed(ledger: OrderLedger) -> UUID:
    """Write a Placed event in its version 1 shape straight into the store."""
    order_id = uuid4()
    # Version 1 had no client_reference, and version 1 events carry no class_version key.
    state: dict[str, Any] = {
        "timestamp": PLACED_AT,
        "originator_topic": get_topic(Order),
        "customer_id": "cust-legacy",
        "currency": "GBP",
        "lines": V1_LINES,
        "shipping_address": "1 Old Road",
    }
    ledger.recorder.insert_events(
        [
            StoredEvent(
                originator_id=order_id,
                originator_version=1,
                topic=get_topic(Order.Placed),
                state=ledger.mapper.transcoder.encode(state),
            )
        ]
    )
    return order_id


def stored_state(ledger: OrderLedger, order_id: UUID, version: int) -> dict[str, Any]:
    """The decoded state of one stored event, as the store holds it."""
    (stored,) = [
        event
        for event in ledger.recorder.select_events(order_id)
        if event.originator_version == version
    ]
    state: dict[str, Any] = ledger.mapper.transcoder.decode(stored.state)
    return state


class TestVersion1PlacedEvents:
    def test_a_v1_order_loads_with_no_client_reference_and_its_totals(
        self, ledger: OrderLedger
    ) -> None:
        """The upcast gives a v1 order client_reference None; everything else is as stored."""
        order_id = store_v1_placed(ledger)
        assert "class_version" not in stored_state(ledger, order_id, 1)

        order = ledger.get_order(order_id)

        assert order.client_reference is None
        assert order.customer_id == "cust-legacy"
        assert order.currency == "GBP"
        assert order.shipping_address == "1 Old Road"
        assert order.total == 3300
        assert order.balance_due == 3300
        assert order.status == OrderStatus.PENDING_PAYMENT
        assert order.version == 1
        assert order.created_on == PLACED_AT
        snapshot = order.snapshot()
        assert snapshot["client_reference"] is None
        assert snapshot["lines"] == V1_LINES
        assert snapshot["placed_at"] == PLACED_AT.isoformat()

    def test_the_history_of_a_v1_order_names_its_placed_event(self, ledger: OrderLedger) -> None:
        """Audit history reads a v1 event as OrderPlaced, upcast, with its original time."""
        order_id = store_v1_placed(ledger)

        (entry,) = ledger.order_history(order_id)

        assert entry.type == "OrderPlaced"
        assert entry.version == 1
        assert entry.timestamp == PLACED_AT
        assert entry.data["client_reference"] is None
        assert entry.data["customer_id"] == "cust-legacy"
        assert entry.data["lines"] == V1_LINES

    def test_a_v1_order_takes_new_commands(self, ledger: OrderLedger) -> None:
        """A legacy order is paid and shipped like any other; the v1 event stays as stored."""
        order_id = store_v1_placed(ledger)

        ledger.capture_payment(order_id, amount=3300, payment_reference="pay-legacy")
        result = ledger.ship_order(order_id, carrier="Royal Mail", tracking_number="RM1")

        assert result.version == 3
        order = ledger.get_order(order_id)
        assert order.status == OrderStatus.SHIPPED
        assert order.client_reference is None
        assert [entry.type for entry in ledger.order_history(order_id)] == [
            "OrderPlaced",
            "PaymentCaptured",
            "OrderShipped",
        ]
        assert "class_version" not in stored_state(ledger, order_id, 1)
        # Events that are still at version 1 store no class_version either.
        assert "class_version" not in stored_state(ledger, order_id, 2)


class TestVersion2PlacedEvents:
    def test_a_v2_order_loads_with_no_customer_email(self, ledger: OrderLedger) -> None:
        """A Placed stored at version 2 (before customer_email) loads with customer_email None."""
        order_id = uuid4()
        state: dict[str, Any] = {
            "timestamp": PLACED_AT,
            "originator_topic": get_topic(Order),
            "customer_id": "cust-v2",
            "currency": "EUR",
            "lines": V1_LINES,
            "shipping_address": None,
            "client_reference": "web-2",
            "class_version": 2,
        }
        ledger.recorder.insert_events(
            [
                StoredEvent(
                    originator_id=order_id,
                    originator_version=1,
                    topic=get_topic(Order.Placed),
                    state=ledger.mapper.transcoder.encode(state),
                )
            ]
        )
        order = ledger.get_order(order_id)
        assert order.customer_email is None
        assert order.client_reference == "web-2"
        assert order.total == 3300
        (entry,) = ledger.order_history(order_id)
        assert entry.data["customer_email"] is None


class TestCurrentPlacedEvents:
    def test_a_new_placed_event_stores_its_class_version_and_round_trips(
        self, ledger: OrderLedger, store_url: str
    ) -> None:
        """New Placed events record class_version 3 and read back their client_reference."""
        placed = ledger.place_order(
            customer_id="cust-new",
            currency="EUR",
            lines=V1_LINES,
            client_reference="web-77",
        )

        state = stored_state(ledger, placed.order_id, 1)
        assert state["class_version"] == 3
        assert state["client_reference"] == "web-77"

        # A fresh ledger on the same store decodes it without any in-memory state.
        reopened = open_ledger_at(store_url)
        try:
            order = reopened.get_order(placed.order_id)
            (entry,) = reopened.order_history(placed.order_id)
        finally:
            reopened.close()
        assert order.client_reference == "web-77"
        assert order.total == 3300
        assert entry.type == "OrderPlaced"
        assert entry.data["client_reference"] == "web-77"
        assert "class_version" not in entry.data

    def test_a_new_placed_event_without_a_client_reference_keeps_none(
        self, ledger: OrderLedger
    ) -> None:
        """None is stored as such and is not confused with a missing v1 field."""
        placed = ledger.place_order(customer_id="cust-new", currency="EUR", lines=V1_LINES)

        state = stored_state(ledger, placed.order_id, 1)
        assert state["class_version"] == 3
        assert "client_reference" in state
        assert state["client_reference"] is None
        assert ledger.get_order(placed.order_id).client_reference is None
