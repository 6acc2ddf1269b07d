"""OrderLedger's commands on a real store: results, rejections, expected versions, idempotency."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import replace
from uuid import UUID, uuid4

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError
from eventsourcing.utils import get_topic

from domain.errors import (
    ConcurrencyConflictError,
    DuplicateLineError,
    IdempotencyKeyReusedError,
    InvalidAmountError,
    InvalidCommandError,
    InvalidCurrencyError,
    LastLineRemovalError,
    OrderAlreadyShippedError,
    OrderNotFoundError,
    OrderNotFullyPaidError,
    OrderNotShippedError,
    PaymentExceedsTotalError,
    RefundExceedsCapturedError,
)
from domain.eventstore import event_store_env
from domain.idempotency import IDEMPOTENCY_TABLE, IdempotencyRecord
from domain.ledger import MAX_IDEMPOTENCY_KEY_LENGTH, CommandResult, OrderLedger
from domain.order import Order
from tests.support.stores import open_ledger_at

Setup = Callable[[OrderLedger], UUID | None]
Command = Callable[[OrderLedger, UUID | None, str | None], CommandResult]


@pytest.fixture
def ledger(store_url: str) -> Iterator[OrderLedger]:
    """A ledger on a fresh store."""
    ledger = open_ledger_at(store_url)
    yield ledger
    ledger.close()


def _place(ledger: OrderLedger, *, key: str | None = None, skus: int = 1) -> CommandResult:
    return ledger.place_order(
        customer_id="cust-1",
        currency="EUR",
        lines=[{"sku": f"SKU-{n}", "quantity": 2, "unit_price": 500} for n in range(1, skus + 1)],
        idempotency_key=key,
    )


def _placed(ledger: OrderLedger) -> UUID:
    return _place(ledger).order_id


def _placed_with_two_lines(ledger: OrderLedger) -> UUID:
    return _place(ledger, skus=2).order_id


def _paid(ledger: OrderLedger) -> UUID:
    order_id = _placed(ledger)
    ledger.capture_payment(order_id, amount=1000, payment_reference="pay-full")
    return order_id


def _shipped(ledger: OrderLedger) -> UUID:
    order_id = _paid(ledger)
    ledger.ship_order(order_id, carrier="UPS", tracking_number="1Z999")
    return order_id


def _nothing(ledger: OrderLedger) -> None:
    return None


def _order(order_id: UUID | None) -> UUID:
    assert order_id is not None
    return order_id


# Every command, with the state it needs and a valid way to call it.
COMMANDS: dict[str, tuple[Setup, Command]] = {
    "place_order": (_nothing, lambda ledger, _, key: _place(ledger, key=key)),
    "add_line": (
        _placed,
        lambda ledger, order_id, key: ledger.add_line(
            _order(order_id), sku="SKU-9", quantity=1, unit_price=250, idempotency_key=key
        ),
    ),
    "remove_line": (
        _placed_with_two_lines,
        lambda ledger, order_id, key: ledger.remove_line(
            _order(order_id), sku="SKU-2", idempotency_key=key
        ),
    ),
    "capture_payment": (
        _placed,
        lambda ledger, order_id, key: ledger.capture_payment(
            _order(order_id), amount=400, payment_reference="pay-1", idempotency_key=key
        ),
    ),
    "ship_order": (
        _paid,
        lambda ledger, order_id, key: ledger.ship_order(
            _order(order_id), carrier="DHL", tracking_number="JD014", idempotency_key=key
        ),
    ),
    "deliver_order": (
        _shipped,
        lambda ledger, order_id, key: ledger.deliver_order(_order(order_id), idempotency_key=key),
    ),
    "cancel_order": (
        _placed,
        lambda ledger, order_id, key: ledger.cancel_order(
            _order(order_id), reason="changed my mind", idempotency_key=key
        ),
    ),
    "issue_refund": (
        _paid,
        lambda ledger, order_id, key: ledger.issue_refund(
            _order(order_id), amount=300, reason="damaged", idempotency_key=key
        ),
    ),
}


class TestCommandResults:
    """Every command reports the order, its new version and its event's global position."""

    def test_a_lifecycle_returns_increasing_versions_and_positions(
        self, ledger: OrderLedger
    ) -> None:
        """Place, edit, pay, ship and deliver: versions count up by one, positions grow."""
        placed = _place(ledger, skus=2)
        order_id = placed.order_id
        results = [
            placed,
            ledger.add_line(order_id, sku="SKU-3", quantity=1, unit_price=100),
            ledger.remove_line(order_id, sku="SKU-1"),
            ledger.capture_payment(order_id, amount=600, payment_reference="pay-1"),
            ledger.capture_payment(order_id, amount=500, payment_reference="pay-2"),
            ledger.ship_order(order_id, carrier="DHL", tracking_number="JD1"),
            ledger.deliver_order(order_id),
        ]
        assert {r.order_id for r in results} == {order_id}
        assert [r.version for r in results] == list(range(1, 8))
        positions = [r.position for r in results]
        assert positions == sorted(set(positions))
        assert not any(r.replayed for r in results)
        assert ledger.head_position() == positions[-1]
        assert ledger.get_order(order_id).status == "delivered"

    def test_cancel_and_refund_return_the_next_versions(self, ledger: OrderLedger) -> None:
        """Cancelling a paid order and refunding it each record one event."""
        order_id = _paid(ledger)
        cancelled = ledger.cancel_order(order_id, reason="out of stock")
        refunded = ledger.issue_refund(order_id, amount=1000, reason="out of stock")
        assert (cancelled.version, refunded.version) == (3, 4)
        assert refunded.position == cancelled.position + 1 == ledger.head_position()
        order = ledger.get_order(order_id)
        assert (order.status, order.refunded, order.refund_due) == ("cancelled", 1000, 0)

    def test_each_position_is_the_one_its_event_has_in_the_history(
        self, ledger: OrderLedger
    ) -> None:
        """The position a command returns is where history shows its event."""
        order_id = _placed(ledger)
        other = _placed(ledger)
        paid = ledger.capture_payment(order_id, amount=200, payment_reference="p1")
        ledger.capture_payment(other, amount=200, payment_reference="p1")
        cancelled = ledger.cancel_order(order_id, reason="duplicate order")
        history = ledger.order_history(order_id)
        assert [(e.version, e.position) for e in history[1:]] == [
            (paid.version, paid.position),
            (cancelled.version, cancelled.position),
        ]


REJECTED: list[tuple[str, Setup, Callable[[OrderLedger, UUID], object], type[Exception]]] = [
    (
        "unknown currency",
        _nothing,
        lambda ledger, _: ledger.place_order(
            customer_id="c", currency="EURO", lines=[{"sku": "A", "quantity": 1, "unit_price": 1}]
        ),
        InvalidCurrencyError,
    ),
    (
        "order without lines",
        _nothing,
        lambda ledger, _: ledger.place_order(customer_id="c", currency="EUR", lines=[]),
        InvalidCommandError,
    ),
    (
        "duplicate line",
        _placed,
        lambda ledger, order_id: ledger.add_line(order_id, sku="SKU-1", quantity=1, unit_price=1),
        DuplicateLineError,
    ),
    (
        "removing the last line",
        _placed,
        lambda ledger, order_id: ledger.remove_line(order_id, sku="SKU-1"),
        LastLineRemovalError,
    ),
    (
        "float amount",
        _placed,
        lambda ledger, order_id: ledger.capture_payment(
            order_id,
            amount=10.5,  # type: ignore[arg-type]
            payment_reference="p",
        ),
        InvalidAmountError,
    ),
    (
        "capture above the total",
        _placed,
        lambda ledger, order_id: ledger.capture_payment(
            order_id, amount=1001, payment_reference="p"
        ),
        PaymentExceedsTotalError,
    ),
    (
        "shipping unpaid",
        _placed,
        lambda ledger, order_id: ledger.ship_order(order_id, carrier="DHL", tracking_number="1"),
        OrderNotFullyPaidError,
    ),
    (
        "delivering unshipped",
        _paid,
        lambda ledger, order_id: ledger.deliver_order(order_id),
        OrderNotShippedError,
    ),
    (
        "cancelling shipped",
        _shipped,
        lambda ledger, order_id: ledger.cancel_order(order_id, reason="late"),
        OrderAlreadyShippedError,
    ),
    (
        "blank cancel reason",
        _placed,
        lambda ledger, order_id: ledger.cancel_order(order_id, reason="  "),
        InvalidCommandError,
    ),
    (
        "refund above captured",
        _paid,
        lambda ledger, order_id: ledger.issue_refund(order_id, amount=1001, reason="r"),
        RefundExceedsCapturedError,
    ),
    (
        "unknown order",
        _placed,
        lambda ledger, _: ledger.capture_payment(uuid4(), amount=1, payment_reference="p"),
        OrderNotFoundError,
    ),
]


class TestRejectedCommands:
    """A command the rules refuse raises a named error and records nothing."""

    @pytest.mark.parametrize(
        ("setup", "command", "error"),
        [pytest.param(setup, command, error, id=name) for name, setup, command, error in REJECTED],
    )
    def test_a_rejected_command_records_nothing(
        self,
        ledger: OrderLedger,
        setup: Setup,
        command: Callable[[OrderLedger, UUID], object],
        error: type[Exception],
    ) -> None:
        """The error is raised and the store's head and the order's version stay put."""
        order_id = setup(ledger)
        head = ledger.head_position()
        version = ledger.get_order(order_id).version if order_id else None

        with pytest.raises(error):
            command(ledger, order_id or uuid4())

        assert ledger.head_position() == head
        if order_id is not None:
            assert ledger.get_order(order_id).version == version
            assert len(ledger.order_history(order_id)) == version


class TestExpectedVersion:
    """A command carrying the version it expects fails if the order has moved on."""

    def test_a_command_at_the_expected_version_is_recorded(self, ledger: OrderLedger) -> None:
        """The expected version matches, so the command records the next one."""
        order_id = _placed(ledger)
        result = ledger.capture_payment(
            order_id, amount=100, payment_reference="p", expected_version=1
        )
        assert result.version == 2

    @pytest.mark.parametrize("expected", [0, 1, 3, 99])
    def test_a_command_at_another_version_conflicts_and_records_nothing(
        self, ledger: OrderLedger, expected: int
    ) -> None:
        """A stale or future expected version raises a conflict naming the current version."""
        order_id = _placed(ledger)
        ledger.add_line(order_id, sku="SKU-2", quantity=1, unit_price=100)
        head = ledger.head_position()

        with pytest.raises(ConcurrencyConflictError) as conflict:
            ledger.capture_payment(
                order_id, amount=100, payment_reference="p", expected_version=expected
            )

        assert conflict.value.current_version == 2
        assert ledger.head_position() == head
        assert ledger.get_order(order_id).captured == 0

    def test_a_conflict_does_not_use_up_the_idempotency_key(self, ledger: OrderLedger) -> None:
        """After a conflict the same key goes through with the right expected version."""
        order_id = _placed(ledger)
        ledger.add_line(order_id, sku="SKU-2", quantity=1, unit_price=100)
        with pytest.raises(ConcurrencyConflictError):
            ledger.capture_payment(
                order_id, amount=100, payment_reference="p", expected_version=1, idempotency_key="k"
            )

        result = ledger.capture_payment(
            order_id, amount=100, payment_reference="p", expected_version=2, idempotency_key="k"
        )

        assert (result.version, result.replayed) == (3, False)


class TestIdempotency:
    """A command sent again with the same key is recorded once and answered the same."""

    @pytest.mark.parametrize("name", list(COMMANDS))
    def test_repeating_a_keyed_command_returns_the_first_result(
        self, ledger: OrderLedger, name: str
    ) -> None:
        """Every command type: the repeat is marked replayed and records no event."""
        setup, command = COMMANDS[name]
        order_id = setup(ledger)
        first = command(ledger, order_id, f"{name}-key")
        head = ledger.head_position()
        history = ledger.order_history(first.order_id)

        again = command(ledger, order_id, f"{name}-key")

        assert not first.replayed
        assert again == replace(first, replayed=True)
        assert ledger.head_position() == head
        assert ledger.order_history(first.order_id) == history

    def test_a_key_is_read_only_when_its_command_fails(
        self, ledger: OrderLedger, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The unique record makes a key once; the store is asked about it only after a
        failure: never for a first command, once for its repeat."""
        reads: list[str] = []
        original = OrderLedger._recorded_result

        def counted(self: OrderLedger, key: str, fingerprint: str) -> CommandResult | None:
            reads.append(key)
            return original(self, key, fingerprint)

        monkeypatch.setattr(OrderLedger, "_recorded_result", counted)
        order_id = _placed(ledger)
        pay = {"amount": 100, "payment_reference": "p1", "idempotency_key": "pay-once"}
        place = {"customer_id": "c-9", "currency": "EUR", "idempotency_key": "place-once"}
        lines = [{"sku": "SKU-1", "quantity": 1, "unit_price": 100}]

        ledger.capture_payment(order_id, **pay)
        ledger.place_order(**place, lines=lines)
        assert reads == []

        assert ledger.capture_payment(order_id, **pay).replayed  # breaks a rule: paid twice
        assert ledger.place_order(**place, lines=lines).replayed  # collides with its record
        assert reads == ["pay-once", "place-once"]

    def test_the_first_result_comes_back_after_the_order_moved_on(
        self, ledger: OrderLedger
    ) -> None:
        """A late repeat gets the version and position of the first time, not the latest."""
        order_id = _placed(ledger)
        first = ledger.capture_payment(
            order_id, amount=100, payment_reference="p1", idempotency_key="pay-once"
        )
        ledger.capture_payment(order_id, amount=100, payment_reference="p2")

        again = ledger.capture_payment(
            order_id, amount=100, payment_reference="p1", idempotency_key="pay-once"
        )

        assert (again.version, again.position, again.replayed) == (2, first.position, True)
        assert ledger.get_order(order_id).captured == 200

    def test_a_repeat_is_recognised_by_a_ledger_opened_later(self, store_url: str) -> None:
        """The key lives in the store, not in the process that first saw it."""
        first_ledger = open_ledger_at(store_url)
        first = _place(first_ledger, key="order-from-checkout-1")
        first_ledger.close()
        reopened = open_ledger_at(store_url)
        try:
            again = _place(reopened, key="order-from-checkout-1")
        finally:
            reopened.close()
        assert again == replace(first, replayed=True)

    def test_a_place_order_repeat_does_not_create_a_second_order(self, ledger: OrderLedger) -> None:
        """Placing with the same key twice leaves one OrderPlaced event in the store."""
        first = _place(ledger, key="checkout-42")
        _place(ledger, key="checkout-42")
        placed = ledger.recorder.select_notifications(
            start=1, limit=100, topics=[get_topic(Order.Placed)]
        )
        assert [n.originator_id for n in placed] == [first.order_id]

    @pytest.mark.parametrize(
        "reuse",
        [
            pytest.param(
                lambda ledger, order_id: ledger.capture_payment(
                    order_id, amount=101, payment_reference="p1", idempotency_key="k"
                ),
                id="other-amount",
            ),
            pytest.param(
                lambda ledger, order_id: ledger.capture_payment(
                    order_id, amount=100, payment_reference="p9", idempotency_key="k"
                ),
                id="other-reference",
            ),
            pytest.param(
                lambda ledger, order_id: ledger.cancel_order(
                    order_id, reason="r", idempotency_key="k"
                ),
                id="other-command",
            ),
            pytest.param(
                lambda ledger, _: ledger.capture_payment(
                    _placed(ledger), amount=100, payment_reference="p1", idempotency_key="k"
                ),
                id="other-order",
            ),
            pytest.param(lambda ledger, _: _place(ledger, key="k"), id="place-order"),
        ],
    )
    def test_reusing_a_key_for_a_different_command_is_rejected(
        self, ledger: OrderLedger, reuse: Callable[[OrderLedger, UUID], object]
    ) -> None:
        """The key names one command: anything else under it is refused and records nothing."""
        order_id = _placed(ledger)
        ledger.capture_payment(order_id, amount=100, payment_reference="p1", idempotency_key="k")

        with pytest.raises(IdempotencyKeyReusedError, match="'k'"):
            reuse(ledger, order_id)

        assert ledger.get_order(order_id).version == 2
        assert ledger.get_order(order_id).captured == 100

    def test_a_rejected_keyed_command_leaves_the_key_free(self, ledger: OrderLedger) -> None:
        """Nothing is recorded for a refused command, so the key works once the input is fixed."""
        order_id = _placed(ledger)
        head = ledger.head_position()
        with pytest.raises(PaymentExceedsTotalError):
            ledger.capture_payment(
                order_id, amount=5000, payment_reference="p", idempotency_key="pay-7"
            )
        assert ledger.head_position() == head

        fixed = ledger.capture_payment(
            order_id, amount=500, payment_reference="p", idempotency_key="pay-7"
        )
        again = ledger.capture_payment(
            order_id, amount=500, payment_reference="p", idempotency_key="pay-7"
        )

        assert (fixed.version, fixed.replayed) == (2, False)
        assert again == replace(fixed, replayed=True)

    @pytest.mark.parametrize("key", ["", "k" * (MAX_IDEMPOTENCY_KEY_LENGTH + 1)])
    def test_an_empty_or_overlong_key_is_rejected(self, ledger: OrderLedger, key: str) -> None:
        """Keys are 1 to 255 characters."""
        with pytest.raises(InvalidCommandError, match="idempotency key"):
            _place(ledger, key=key)
        assert ledger.head_position() == 0

    def test_a_key_of_the_maximum_length_is_accepted(self, ledger: OrderLedger) -> None:
        """A 255-character key works and is recognised on repeat."""
        key = "k" * MAX_IDEMPOTENCY_KEY_LENGTH
        first = _place(ledger, key=key)
        assert _place(ledger, key=key) == replace(first, replayed=True)


def _refuse_key_records(store_url: str) -> None:
    """Make the database itself refuse to store an idempotency key, as a failing disk would."""
    if store_url.startswith("sqlite"):
        conn = sqlite3.connect(event_store_env(store_url)["SQLITE_DBNAME"])
        try:
            conn.execute(
                f"CREATE TRIGGER refuse_key_records BEFORE INSERT ON {IDEMPOTENCY_TABLE} "
                "BEGIN SELECT RAISE(ABORT, 'store refused the key record'); END"
            )
            conn.commit()
        finally:
            conn.close()
        return
    with psycopg.connect(store_url, autocommit=True) as pg:
        pg.execute(
            "CREATE FUNCTION refuse_key_records() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'store refused the key record' "
            "USING ERRCODE = 'check_violation'; END $$"
        )
        pg.execute(
            f"CREATE TRIGGER refuse_key_records BEFORE INSERT ON {IDEMPOTENCY_TABLE} "
            "FOR EACH ROW EXECUTE FUNCTION refuse_key_records()"
        )


class TestKeyAndEventsAreAtomic:
    """The key's record and the command's events are stored together or not at all."""

    @pytest.mark.parametrize("name", ["place_order", "capture_payment"])
    def test_when_the_key_cannot_be_stored_the_events_are_not_stored_either(
        self, ledger: OrderLedger, store_url: str, name: str
    ) -> None:
        """The store refusing the key record rolls back the order's event in the same save."""
        setup, command = COMMANDS[name]
        order_id = setup(ledger)
        head = ledger.head_position()
        _refuse_key_records(store_url)

        with pytest.raises(IntegrityError, match="store refused the key record"):
            command(ledger, order_id, "atomic-key")

        assert ledger.head_position() == head
        if order_id is not None:
            assert ledger.get_order(order_id).version == 1
        # Without a key the same command still goes through: only the key record was refused.
        # (PostgreSQL's sequence skips the numbers of the rolled-back rows.)
        result = command(ledger, order_id, None)
        assert result.position > head
        assert ledger.head_position() == result.position


def _drop_key_table(store_url: str) -> None:
    """Leave the store as a version that kept keys as events left it: no key table."""
    if store_url.startswith("sqlite"):
        with sqlite3.connect(event_store_env(store_url)["SQLITE_DBNAME"]) as conn:
            conn.execute(f"DROP TABLE {IDEMPOTENCY_TABLE}")
        return
    with psycopg.connect(store_url, autocommit=True) as pg:
        pg.execute(f"DROP TABLE {IDEMPOTENCY_TABLE}")


class TestKeysStoredByEarlierVersions:
    """Earlier versions stored each key as an event of its own aggregate."""

    def test_a_commands_fingerprint_is_the_one_earlier_versions_recorded(
        self, store_url: str
    ) -> None:
        """A repeat is told from a reuse by comparing fingerprints: one computed differently
        would refuse every repeat of a key recorded before the upgrade."""
        ledger = open_ledger_at(store_url)
        try:
            ledger.place_order(
                customer_id="c-1",
                currency="EUR",
                lines=[{"sku": "SKU-1", "quantity": 2, "unit_price": 1500}],
                shipping_address="1 Rue de la Paix",
                idempotency_key="pinned",
            )
            stored = ledger.store.command_key("pinned")
        finally:
            ledger.close()
        assert stored is not None
        assert stored.fingerprint == (
            "987bb6916d4cd1c1128b80f2a36377a0216083945f1d98736161b48d981fc44b"
        )

    def test_a_key_stored_as_an_event_still_answers_its_repeat_after_the_upgrade(
        self, store_url: str
    ) -> None:
        ledger = open_ledger_at(store_url)
        try:
            first = _place(ledger, key="before-upgrade")
            stored = ledger.store.command_key("before-upgrade")
            assert stored is not None
            ledger.save(
                IdempotencyRecord(
                    key=stored.key,
                    fingerprint=stored.fingerprint,
                    order_id=stored.order_id,
                    order_version=stored.order_version,
                )
            )
            head = ledger.head_position()
        finally:
            ledger.close()
        _drop_key_table(store_url)

        upgraded = open_ledger_at(store_url)
        try:
            again = _place(upgraded, key="before-upgrade")
            assert again == replace(first, replayed=True)
            assert upgraded.head_position() == head
            with pytest.raises(IdempotencyKeyReusedError):
                _place(upgraded, key="before-upgrade", skus=2)
            # Opened again, the table is not filled a second time.
            open_ledger_at(store_url).close()
            assert _place(upgraded, key="before-upgrade") == again
        finally:
            upgraded.close()
