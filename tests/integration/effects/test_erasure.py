"""Customer emails after an erasure: never sent, never kept, never recorded again.

The outbox names a customer, not an address; the sender reads the address from the order when
it sends. Erasing the customer cancels their emails still pending or dead, an email already
claimed finds the address erased and is cancelled, and a rebuild after the erasure records and
sends nothing again. On both stores, no table holds an address or shipping detail afterwards.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from sqlalchemy import Engine

from domain.ledger import OrderLedger
from projections.effects.dispatcher import DispatchSettings
from projections.effects.outbox import CANCELLED, DEAD, DELIVERED, ERASED_REASON, PENDING
from projections.effects.service import Effects
from projections.engine.runtime import ProjectionRuntime
from tests.support.effects import CatchUp, MakeDispatcher, attempt_rows, outbox_rows, settle
from tests.support.raw_events import values_held
from tests.support.receivers import SmtpServer

ANA = {
    "customer_email": "ana.lopez@example.com",
    "shipping_address": "Calle Mayor 7, 28013 Madrid",
    "client_reference": "ana-birthday-gift",
}
TRACKING = "TRK-ANA-000123"
LINES = [{"sku": "MUG-1", "quantity": 2, "unit_price": 1250}]


def place(ledger: OrderLedger, customer_id: str = "cust-ana", **personal: Any) -> UUID:
    values = personal or ANA
    return ledger.place_order(
        customer_id=customer_id, currency="EUR", lines=LINES, **values
    ).order_id


def ship(ledger: OrderLedger, order_id: UUID) -> None:
    ledger.capture_payment(order_id, amount=2500, payment_reference="psp-1")
    ledger.ship_order(order_id, carrier="DHL", tracking_number=TRACKING)


def statuses(engine: Engine) -> dict[tuple[str, str], str]:
    """Each email effect's status, by (order id, effect)."""
    return {
        (row["order_id"], row["effect"]): row["status"]
        for row in outbox_rows(engine)
        if row["kind"] == "email"
    }


class TestCancelledByErasure:
    def test_pending_and_dead_emails_of_the_customer_are_cancelled_and_others_sent(
        self,
        ledger: OrderLedger,
        runtime: ProjectionRuntime,
        effects_service: Effects,
        catch_up: CatchUp,
        smtp_server: SmtpServer,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        dead_order = place(ledger)
        catch_up()
        settle(make_dispatcher(DispatchSettings(max_attempts=1)), runtime.engine)  # no server
        pending_order = place(ledger)
        other = place(ledger, "cust-ben", customer_email="ben@example.com")
        catch_up()
        assert set(statuses(runtime.engine).values()) == {DEAD, PENDING}

        ledger.erase_customer("cust-ana", reason="GDPR request")
        catch_up()

        rows = {row["order_id"]: row for row in outbox_rows(runtime.engine)}
        for order_id in (dead_order, pending_order):
            assert rows[str(order_id)]["status"] == CANCELLED
            assert rows[str(order_id)]["last_error"] == ERASED_REASON
        assert rows[str(other)]["status"] == PENDING
        assert effects_service.retry_all_dead() == 0  # a cancelled email is not a dead letter

        settle(make_dispatcher(smtp=smtp_server.settings), runtime.engine)
        assert [email.rcpt_tos for email in smtp_server.received()] == [["ben@example.com"]]
        assert effects_service.counts() == {PENDING: 0, DELIVERED: 1, DEAD: 0, CANCELLED: 2}

    def test_an_email_sent_before_the_outbox_sees_the_erasure_is_cancelled_not_sent(
        self,
        ledger: OrderLedger,
        runtime: ProjectionRuntime,
        catch_up: CatchUp,
        smtp_server: SmtpServer,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        order_id = place(ledger)
        catch_up()
        ledger.erase_customer("cust-ana", reason="GDPR request")  # the outbox has not seen it

        dispatcher = make_dispatcher(smtp=smtp_server.settings)
        assert dispatcher.run_once() == 1

        [row] = outbox_rows(runtime.engine)
        assert (row["order_id"], row["status"]) == (str(order_id), CANCELLED)
        assert [a["outcome"] for a in attempt_rows(runtime.engine, row["id"])] == [CANCELLED]
        assert smtp_server.received() == []
        assert dispatcher.run_once() == 0  # never retried

    def test_a_later_order_of_the_customer_is_emailed_after_a_cancellation(
        self,
        ledger: OrderLedger,
        runtime: ProjectionRuntime,
        catch_up: CatchUp,
        smtp_server: SmtpServer,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        """Cancelled counts as done for ordering: a new order of the customer gets its email."""
        place(ledger)
        catch_up()
        ledger.erase_customer("cust-ana", reason="GDPR request")
        later = place(ledger, customer_email="ana.new@example.com")
        catch_up()

        settle(make_dispatcher(smtp=smtp_server.settings), runtime.engine)

        assert [email.rcpt_tos for email in smtp_server.received()] == [["ana.new@example.com"]]
        assert statuses(runtime.engine)[(str(later), "email:OrderPlaced")] == DELIVERED


class TestRebuildAfterErasure:
    def test_rebuilding_the_outbox_records_and_sends_nothing_again(
        self,
        ledger: OrderLedger,
        runtime: ProjectionRuntime,
        catch_up: CatchUp,
        smtp_server: SmtpServer,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        ship(ledger, place(ledger))
        place(ledger)
        catch_up()
        dispatcher = make_dispatcher(smtp=smtp_server.settings)
        settle(dispatcher, runtime.engine)
        place(ledger)  # recorded, not yet sent
        catch_up()
        ledger.erase_customer("cust-ana", reason="GDPR request")
        catch_up()
        before = outbox_rows(runtime.engine)
        assert [r["status"] for r in before] == [DELIVERED] * 3 + [CANCELLED]

        runtime.catalog.start_rebuild("outbox", target=ledger.head_position())
        catch_up()

        assert outbox_rows(runtime.engine) == before
        assert dispatcher.run_once() == 0
        assert len(smtp_server.received()) == 3


class TestNothingPersonalInAnyTable:
    """After every projection, the outbox and the dispatcher ran, and after the erasure, no
    table (SQLite: no byte of the database file or its WAL) holds a personal value."""

    def test_on_every_store(
        self,
        ledger: OrderLedger,
        runtime: ProjectionRuntime,
        store_url: str,
        catch_up: CatchUp,
        smtp_server: SmtpServer,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        names = [p.name for p in runtime.projections]
        order_id = place(ledger)
        ship(ledger, order_id)
        catch_up(names)
        settle(make_dispatcher(smtp=smtp_server.settings), runtime.engine)
        assert len(smtp_server.received()) == 2  # the addresses were used...
        secrets = [*ANA.values(), TRACKING]
        assert values_held(store_url, ["cust-ana", *secrets]) == ["cust-ana"]

        ledger.erase_customer("cust-ana", reason="GDPR request")
        catch_up(names)

        assert values_held(store_url, secrets) == []  # ...and kept nowhere
