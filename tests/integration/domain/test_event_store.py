"""The event store's contract, written once and run on SQLite and on PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import timedelta, timezone
from itertools import pairwise
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import IntegrityError

from domain.chain import GENESIS, event_hash
from domain.errors import InvalidCommandError, OrderNotFoundError
from domain.eventstore import IMMUTABLE_MESSAGE, MAX_EVENTS_PER_STATEMENT
from domain.ledger import CommandResult, OrderLedger
from domain.order import Order
from tests.support.raw_events import RawEvents
from tests.support.stores import open_ledger_at


@pytest.fixture
def ledger(store_url: str) -> Iterator[OrderLedger]:
    """A ledger on a fresh store."""
    ledger = open_ledger_at(store_url)
    yield ledger
    ledger.close()


def _record_lifecycle(ledger: OrderLedger) -> list[CommandResult]:
    """Place an order and take it through every stage up to delivery."""
    placed = ledger.place_order(
        customer_id="cust-1",
        currency="EUR",
        lines=[{"sku": "SKU-1", "quantity": 2, "unit_price": 1500}],
        shipping_address="1 Rue de la Paix, Paris",
    )
    order_id = placed.order_id
    return [
        placed,
        ledger.add_line(order_id, sku="SKU-2", quantity=1, unit_price=700),
        ledger.capture_payment(order_id, amount=2000, payment_reference="pay-1"),
        ledger.capture_payment(order_id, amount=1700, payment_reference="pay-2"),
        ledger.ship_order(order_id, carrier="DHL", tracking_number="JD0001"),
        ledger.deliver_order(order_id),
    ]


class TestEventStoreContract:
    """What every backend of the order store guarantees."""

    def test_commands_return_increasing_positions_that_end_at_the_head(
        self, ledger: OrderLedger
    ) -> None:
        """Each command's position is past the previous one and is the store's head."""
        positions = []
        for result in _record_lifecycle(ledger):
            positions.append(result.position)
        assert positions == sorted(set(positions))
        assert positions[0] >= 1
        assert ledger.head_position() == positions[-1]

    @pytest.mark.slow  # two saves of 13,000 events
    def test_a_save_too_big_for_one_statement_is_recorded_whole_or_not_at_all(
        self, ledger: OrderLedger
    ) -> None:
        """PostgreSQL takes a save of more events than one statement's parameters allow in
        parts of one transaction: an order chained across the parts, a conflict in the last
        part undoing the first."""
        spanning = Order.place(customer_id="c-1", currency="EUR", lines=[_LINE])
        spanning.add_line(sku="SKU-2", quantity=1, unit_price=700)
        spanning.add_line(sku="SKU-3", quantity=1, unit_price=900)
        before = [
            Order.place(customer_id="c-1", currency="EUR", lines=[_LINE])
            for _ in range(MAX_EVENTS_PER_STATEMENT - 2)
        ]
        after = [Order.place(customer_id="c-1", currency="EUR", lines=[_LINE]) for _ in range(200)]
        recordings = ledger.save(*before, spanning, *after)  # more than 65,535 parameters
        assert len(recordings) == MAX_EVENTS_PER_STATEMENT + 201
        assert ledger.head_position() == recordings[-1].notification.id
        _assert_chained(ledger, spanning.id, 3)

        first, second = (ledger.repository.get(spanning.id) for _ in range(2))
        first.capture_payment(amount=100, payment_reference="p-1")
        ledger.save(first)
        head = ledger.head_position()
        second.capture_payment(amount=100, payment_reference="p-2")  # version 4 again
        others = [
            Order.place(customer_id="c-1", currency="EUR", lines=[_LINE])
            for _ in range(MAX_EVENTS_PER_STATEMENT + 200)
        ]
        with pytest.raises(IntegrityError):
            ledger.save(*others, second)
        assert ledger.head_position() == head
        assert ledger.store.select_aggregate_notifications(others[0].id) == []

    def test_an_empty_store_has_head_position_zero(self, ledger: OrderLedger) -> None:
        """Before any event the head position is 0."""
        assert ledger.head_position() == 0

    def test_history_lists_every_event_in_order_with_its_details(self, ledger: OrderLedger) -> None:
        """History gives position, version, type, timestamp and data of each event, oldest first."""
        results = _record_lifecycle(ledger)
        history = ledger.order_history(results[0].order_id)

        assert [entry.type for entry in history] == [
            "OrderPlaced",
            "OrderLineAdded",
            "PaymentCaptured",
            "PaymentCaptured",
            "OrderShipped",
            "OrderDelivered",
        ]
        assert [entry.version for entry in history] == [1, 2, 3, 4, 5, 6]
        assert [entry.position for entry in history] == [r.position for r in results]
        timestamps = [entry.timestamp for entry in history]
        assert timestamps == sorted(timestamps)
        assert all(ts.tzinfo is not None for ts in timestamps)
        assert history[0].data == {
            "customer_id": "cust-1",
            "currency": "EUR",
            "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": 1500}],
            "shipping_address": "1 Rue de la Paix, Paris",
            "client_reference": None,
            "customer_email": None,
        }
        assert history[1].data == {"sku": "SKU-2", "quantity": 1, "unit_price": 700}
        assert history[2].data == {"amount": 2000, "payment_reference": "pay-1"}
        assert history[4].data == {"carrier": "DHL", "tracking_number": "JD0001"}
        assert history[5].data == {}

    def test_history_of_one_order_leaves_out_other_orders(self, ledger: OrderLedger) -> None:
        """Interleaved orders each get only their own events, with their global positions."""
        first = ledger.place_order(
            customer_id="a", currency="EUR", lines=[{"sku": "X", "quantity": 1, "unit_price": 5}]
        )
        second = ledger.place_order(
            customer_id="b", currency="USD", lines=[{"sku": "Y", "quantity": 1, "unit_price": 9}]
        )
        paid = ledger.capture_payment(first.order_id, amount=5, payment_reference="p")

        assert [(e.position, e.version) for e in ledger.order_history(first.order_id)] == [
            (first.position, 1),
            (paid.position, 2),
        ]
        assert [(e.position, e.version) for e in ledger.order_history(second.order_id)] == [
            (second.position, 1)
        ]

    def test_state_as_of_each_version_replays_only_events_up_to_it(
        self, ledger: OrderLedger
    ) -> None:
        """order_as_of(version=n) is the order after its n-th event."""
        order_id = _record_lifecycle(ledger)[0].order_id
        expected = [
            (1, "pending_payment", 3000, 0),
            (2, "pending_payment", 3700, 0),
            (3, "partially_paid", 3700, 2000),
            (4, "paid", 3700, 3700),
            (5, "shipped", 3700, 3700),
            (6, "delivered", 3700, 3700),
        ]
        for version, status, total, captured in expected:
            order = ledger.order_as_of(order_id, version=version)
            assert (order.version, order.status, order.total, order.captured) == (
                version,
                status,
                total,
                captured,
            )

    def test_state_as_of_a_version_past_the_latest_is_not_found(self, ledger: OrderLedger) -> None:
        """Asking for a version the order never reached is an OrderNotFoundError."""
        order_id = _record_lifecycle(ledger)[0].order_id
        with pytest.raises(OrderNotFoundError, match="no version 7"):
            ledger.order_as_of(order_id, version=7)

    def test_state_as_of_a_moment_is_the_state_after_the_last_event_before_it(
        self, ledger: OrderLedger
    ) -> None:
        """A moment at or between events gives the version recorded last by then."""
        order_id = _record_lifecycle(ledger)[0].order_id
        history = ledger.order_history(order_id)
        for earlier, later in pairwise(history):
            between = earlier.timestamp + (later.timestamp - earlier.timestamp) / 2
            assert ledger.order_as_of(order_id, at=between).version == earlier.version
            assert ledger.order_as_of(order_id, at=earlier.timestamp).version == earlier.version
        after_all = history[-1].timestamp + timedelta(days=1)
        assert ledger.order_as_of(order_id, at=after_all).status == "delivered"

    def test_state_as_of_a_moment_in_another_timezone_means_the_same_instant(
        self, ledger: OrderLedger
    ) -> None:
        """The same instant written with a different offset gives the same version."""
        order_id = _record_lifecycle(ledger)[0].order_id
        third = ledger.order_history(order_id)[2].timestamp
        elsewhere = third.astimezone(timezone(timedelta(hours=-5)))
        assert ledger.order_as_of(order_id, at=elsewhere).version == 3

    def test_state_as_of_a_moment_before_the_first_event_is_not_found(
        self, ledger: OrderLedger
    ) -> None:
        """Before the order was placed it did not exist."""
        order_id = _record_lifecycle(ledger)[0].order_id
        placed_at = ledger.order_history(order_id)[0].timestamp
        with pytest.raises(OrderNotFoundError, match="did not exist yet"):
            ledger.order_as_of(order_id, at=placed_at - timedelta(microseconds=1))

    def test_state_as_of_a_naive_moment_is_rejected(self, ledger: OrderLedger) -> None:
        """A moment without a timezone is ambiguous and rejected."""
        order_id = _record_lifecycle(ledger)[0].order_id
        naive = ledger.order_history(order_id)[0].timestamp.replace(tzinfo=None)
        with pytest.raises(InvalidCommandError, match="timezone"):
            ledger.order_as_of(order_id, at=naive)

    def test_state_as_of_both_a_version_and_a_moment_is_rejected(self, ledger: OrderLedger) -> None:
        """Only one of version and moment may be given."""
        order_id = _record_lifecycle(ledger)[0].order_id
        moment = ledger.order_history(order_id)[0].timestamp
        with pytest.raises(InvalidCommandError, match="either"):
            ledger.order_as_of(order_id, version=1, at=moment)

    def test_an_unknown_order_is_not_found_by_every_read(self, ledger: OrderLedger) -> None:
        """get_order, order_history and order_as_of all raise OrderNotFoundError."""
        _record_lifecycle(ledger)
        unknown = uuid4()
        with pytest.raises(OrderNotFoundError):
            ledger.get_order(unknown)
        with pytest.raises(OrderNotFoundError):
            ledger.order_history(unknown)
        with pytest.raises(OrderNotFoundError):
            ledger.order_as_of(unknown, version=1)

    def test_reopening_the_store_sees_every_event(self, store_url: str) -> None:
        """A new ledger on the same URL reads the same history, state and head."""
        first = open_ledger_at(store_url)
        results = _record_lifecycle(first)
        order_id = results[0].order_id
        history = first.order_history(order_id)
        state = first.get_order(order_id).snapshot()
        first.close()

        reopened = open_ledger_at(store_url)
        try:
            assert reopened.order_history(order_id) == history
            assert reopened.get_order(order_id).snapshot() == state
            assert reopened.head_position() == results[-1].position
            refund = reopened.issue_refund(order_id, amount=100, reason="scratched")
            assert (refund.version, refund.position) == (7, results[-1].position + 1)
        finally:
            reopened.close()

    def test_library_settings_in_the_environment_change_nothing(
        self, store_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The library reads its settings from os.environ, plain and prefixed with the
        application's name; none of them reaches the ledger's store."""
        stray = {
            "POSTGRES_ENABLE_DB_FUNCTIONS": "y",
            "ORDERLEDGER_POSTGRES_ENABLE_DB_FUNCTIONS": "y",
            "ORDERLEDGER_PERSISTENCE_MODULE": "eventsourcing.popo",
            "ORDERLEDGER_SQLITE_DBNAME": f"{tmp_path}/elsewhere.db",
            "ORDERLEDGER_POSTGRES_DBNAME": "elsewhere",
            "ORDERLEDGER_CIPHER_TOPIC": "eventsourcing.cipher:AESCipher",
            "COMPRESSOR_TOPIC": "zlib",
        }
        for name, value in stray.items():
            monkeypatch.setenv(name, value)
        first = open_ledger_at(store_url)
        try:
            placed = _record_lifecycle(first)[0]
            assert type(first.recorder).__module__ == "domain.eventstore"
            assert not getattr(first.recorder.datastore, "enable_db_functions", False)
            assert first.mapper.cipher is None and first.mapper.compressor is None
        finally:
            first.close()
        monkeypatch.delenv("ORDERLEDGER_PERSISTENCE_MODULE")
        reopened = open_ledger_at(store_url)
        try:
            assert reopened.get_order(placed.order_id).version == 6
        finally:
            reopened.close()

    def test_immutability_triggers_exist_as_soon_as_a_new_store_opens(
        self, ledger: OrderLedger, store_url: str
    ) -> None:
        """Opening a new database installs the triggers along with the events table."""
        table = ledger.recorder.events_table_name
        triggers = RawEvents(store_url, table).trigger_names()
        if store_url.startswith("sqlite"):
            assert triggers == {f"{table}_no_update", f"{table}_no_delete"}
        else:
            assert triggers == {f"{table}_no_update_delete", f"{table}_no_truncate"}

    @pytest.mark.parametrize(
        ("operation", "statement"),
        [
            ("UPDATE", "UPDATE {table} SET topic = 'tampered'"),
            ("UPDATE", "UPDATE {table} SET state = state WHERE originator_version = 1"),
            ("DELETE", "DELETE FROM {table}"),
            ("DELETE", "DELETE FROM {table} WHERE originator_version > 1"),
        ],
    )
    def test_changing_recorded_events_in_the_database_fails(
        self, ledger: OrderLedger, store_url: str, operation: str, statement: str
    ) -> None:
        """A raw UPDATE or DELETE is refused by the trigger and leaves every row as it was."""
        _record_lifecycle(ledger)
        table = ledger.recorder.events_table_name
        raw = RawEvents(store_url, table)
        before = raw.rows()

        message = raw.error_from(statement.format(table=table))

        assert f"{IMMUTABLE_MESSAGE}: {operation} on {table} is not allowed" in message
        assert raw.rows() == before
        assert len(before) == 6

    @pytest.mark.postgres
    def test_truncating_the_events_table_fails_on_postgres(self, postgres_url: str) -> None:
        """TRUNCATE skips row triggers, so PostgreSQL has a statement trigger for it."""
        ledger = open_ledger_at(postgres_url)
        try:
            _record_lifecycle(ledger)
            table = ledger.recorder.events_table_name
        finally:
            ledger.close()
        raw = RawEvents(postgres_url, table)
        before = raw.rows()

        message = raw.error_from(f"TRUNCATE {table}")

        assert f"{IMMUTABLE_MESSAGE}: TRUNCATE on {table} is not allowed" in message
        assert raw.rows() == before
        assert len(before) == 6


class TestHashChain:
    """Each order's events are stored chained: every link is computed as the event is written."""

    def test_every_event_is_stored_with_its_link_in_its_orders_chain(
        self, ledger: OrderLedger
    ) -> None:
        results = _record_lifecycle(ledger)
        other = ledger.place_order(customer_id="c-2", currency="EUR", lines=[_LINE])
        ledger.cancel_order(other.order_id, reason="no longer needed")

        _assert_chained(ledger, results[0].order_id, 6)
        _assert_chained(ledger, other.order_id, 2)

    def test_the_metadata_is_covered_by_the_link(self, ledger: OrderLedger) -> None:
        """The metadata rides in the stored state the link hashes."""
        placed = ledger.place_order(customer_id="c-1", currency="EUR", lines=[_LINE])
        stored = ledger.store.select_aggregate_notifications(placed.order_id)[0]
        assert b'"metadata"' in stored.state
        altered = stored.state.replace(b'"request_id"', b'"request_iX"')
        assert altered != stored.state
        assert stored.chain_hash != event_hash(
            GENESIS, stored.originator_id, 1, stored.topic, altered
        )

    def test_a_store_made_before_chaining_gains_the_column_and_chains_new_events(
        self, store_url: str
    ) -> None:
        """Old events stay unchained; an old order's next event starts its chain afresh."""
        ledger = open_ledger_at(store_url)
        placed = ledger.place_order(customer_id="c-1", currency="EUR", lines=[_LINE])
        table = ledger.recorder.events_table_name
        ledger.close()
        RawEvents(store_url, table).as_owner(f"ALTER TABLE {table} DROP COLUMN chain_hash")

        reopened = open_ledger_at(store_url)
        try:
            paid = reopened.capture_payment(
                placed.order_id, amount=_LINE["unit_price"], payment_reference="p-1"
            )
            old, new = reopened.store.select_aggregate_notifications(placed.order_id)
        finally:
            reopened.close()

        assert old.chain_hash is None
        assert new.id == paid.position
        assert new.chain_hash == event_hash(GENESIS, new.originator_id, 2, new.topic, new.state)


_LINE = {"sku": "SKU-1", "quantity": 1, "unit_price": 1500}


def _assert_chained(ledger: OrderLedger, order_id: UUID, events: int) -> None:
    """The order's ``events`` stored events each carry the link that chains them."""
    stored_events = ledger.store.select_aggregate_notifications(order_id)
    assert len(stored_events) == events
    previous = GENESIS
    for stored in stored_events:
        expected = event_hash(
            previous, stored.originator_id, stored.originator_version, stored.topic, stored.state
        )
        assert stored.chain_hash == expected
        previous = expected


class TestSQLitePositions:
    """SQLite-specific guarantees of the global position."""

    def test_vacuum_does_not_renumber_positions(self, sqlite_url: str) -> None:
        """Positions survive VACUUM, which renumbers an implicit rowid."""
        ledger = open_ledger_at(sqlite_url)
        first = ledger.place_order(
            customer_id="c-1", currency="EUR", lines=[{"sku": "A", "quantity": 1, "unit_price": 5}]
        )
        # A second order whose events sit between the first order's events.
        second = ledger.place_order(
            customer_id="c-2", currency="EUR", lines=[{"sku": "B", "quantity": 1, "unit_price": 7}]
        )
        ledger.capture_payment(first.order_id, amount=5, payment_reference="p-1")
        before = [(e.position, e.version) for e in ledger.order_history(first.order_id)]
        ledger.close()
        path = sqlite_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as raw:
            raw.execute("VACUUM")
        reopened = open_ledger_at(sqlite_url)
        after = [(e.position, e.version) for e in reopened.order_history(first.order_id)]
        assert after == before
        assert before[0][0] < second.position < before[1][0]
        assert reopened.head_position() == before[1][0]
        reopened.close()
