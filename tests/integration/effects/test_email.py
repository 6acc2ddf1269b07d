"""Customer emails: one per placed, shipped and refunded order with an address, over real SMTP."""

from __future__ import annotations

import logging
from uuid import UUID

import pytest

from domain.audit import Actor, CommandContext, acting_as
from domain.ledger import OrderLedger
from projections.effects.dispatcher import DispatchSettings
from projections.effects.outbox import DELIVERED, effect_id
from projections.effects.service import Effects
from tests.support.effects import (
    CatchUp,
    MakeDispatcher,
    attempt_rows,
    outbox_rows,
    pay_and_ship,
    place,
    settle,
)
from tests.support.receivers import ReceivedEmail, SmtpServer
from tests.support.waiting import wait_for


def _position(ledger: OrderLedger, order_id: UUID, event_type: str) -> int:
    return next(e.position for e in ledger.order_history(order_id) if e.type == event_type)


def _body(email: ReceivedEmail) -> str:
    payload = email.message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


class TestCustomerEmails:
    """Placed, shipped and refunded orders email the customer once each."""

    def test_placed_shipped_and_refunded_orders_send_one_email_each(
        self,
        ledger: OrderLedger,
        catch_up: CatchUp,
        smtp_server: SmtpServer,
        make_dispatcher: MakeDispatcher,
        effects_service: Effects,
    ) -> None:
        """Each email has the right recipient, subject, Message-ID and amounts."""
        order_id = place(
            ledger,
            email="ada@example.com",
            reference="ADA-1",
            lines=[
                {"sku": "MUG-1", "quantity": 2, "unit_price": 1250},
                {"sku": "TEA-9", "quantity": 1, "unit_price": 123456},
            ],
        )
        pay_and_ship(ledger, order_id)
        ledger.deliver_order(order_id)  # no email for a delivery
        ledger.issue_refund(order_id, amount=705, reason="chipped mug")
        catch_up()

        settle(make_dispatcher(smtp=smtp_server.settings), effects_service.engine)

        inbox = smtp_server.received()
        assert len(inbox) == 3
        by_subject = {email.message["Subject"]: email for email in inbox}
        assert set(by_subject) == {
            "Your order ADA-1 is placed",
            "Your order ADA-1 has shipped",
            "A refund for order ADA-1",
        }
        for email in inbox:
            assert email.rcpt_tos == ["ada@example.com"]
            assert email.message["To"] == "ada@example.com"
            assert email.message["From"] == "orders@shop.example"
        expected_ids = {
            "Your order ADA-1 is placed": ("email:OrderPlaced", "OrderPlaced"),
            "Your order ADA-1 has shipped": ("email:OrderShipped", "OrderShipped"),
            "A refund for order ADA-1": ("email:RefundIssued", "RefundIssued"),
        }
        for subject, (effect, event_type) in expected_ids.items():
            identifier = effect_id(effect, _position(ledger, order_id, event_type))
            assert by_subject[subject].message["Message-ID"] == f"<{identifier}@orderledger>"

        placed = _body(by_subject["Your order ADA-1 is placed"])
        assert "2 x MUG-1 at EUR 12.50" in placed
        assert "1 x TEA-9 at EUR 1,234.56" in placed
        assert "Total: EUR 1,259.56" in placed
        shipped = _body(by_subject["Your order ADA-1 has shipped"])
        assert "DHL" in shipped and "TRACK-42" in shipped
        assert "EUR 7.05" in _body(by_subject["A refund for order ADA-1"])
        assert {row["status"] for row in outbox_rows(effects_service.engine)} == {DELIVERED}

    def test_an_email_carries_the_correlation_of_the_command_behind_it(
        self,
        ledger: OrderLedger,
        catch_up: CatchUp,
        smtp_server: SmtpServer,
        make_dispatcher: MakeDispatcher,
        effects_service: Effects,
    ) -> None:
        context = CommandContext(Actor("key", "key_1", "shop", "writer"), "req-1", "basket-77")
        with acting_as(context):
            place(ledger, email="ada@example.com")
        catch_up()
        settle(make_dispatcher(smtp=smtp_server.settings), effects_service.engine)
        [email] = smtp_server.received()
        assert email.message["Correlation-Id"] == "basket-77"

    @pytest.mark.parametrize(
        ("currency", "unit_price", "shown"),
        [("JPY", 1500, "JPY 1,500"), ("BHD", 12345, "BHD 12.345"), ("USD", 5, "USD 0.05")],
    )
    def test_amounts_are_written_in_the_currencys_minor_units(
        self,
        currency: str,
        unit_price: int,
        shown: str,
        ledger: OrderLedger,
        catch_up: CatchUp,
        smtp_server: SmtpServer,
        make_dispatcher: MakeDispatcher,
        effects_service: Effects,
    ) -> None:
        """Zero, two and three decimal currencies each show their own number of decimals."""
        place(
            ledger,
            email="kim@example.com",
            currency=currency,
            lines=[{"sku": "BOX", "quantity": 1, "unit_price": unit_price}],
        )
        catch_up()

        settle(make_dispatcher(smtp=smtp_server.settings), effects_service.engine)

        (email,) = smtp_server.received()
        body = _body(email)
        assert f"1 x BOX at {shown}" in body
        assert f"Total: {shown}" in body

    def test_an_order_without_an_email_sends_nothing(
        self,
        ledger: OrderLedger,
        catch_up: CatchUp,
        smtp_server: SmtpServer,
        make_dispatcher: MakeDispatcher,
        effects_service: Effects,
    ) -> None:
        """No address, no email effect and no message; the order with an address gets its own."""
        silent = place(ledger)
        pay_and_ship(ledger, silent)
        ledger.issue_refund(silent, amount=100, reason="late")
        placed = place(ledger, email="bo@example.com")
        catch_up()

        rows = outbox_rows(effects_service.engine)
        assert [r["order_id"] for r in rows] == [str(placed)]
        settle(make_dispatcher(smtp=smtp_server.settings), effects_service.engine)

        (email,) = smtp_server.received()
        assert email.rcpt_tos == ["bo@example.com"]


class TestRefusedRecipient:
    def test_a_refused_mailbox_is_stored_and_logged_without_the_address(
        self,
        ledger: OrderLedger,
        catch_up: CatchUp,
        smtp_server: SmtpServer,
        make_dispatcher: MakeDispatcher,
        effects_service: Effects,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """The attempt says what failed (the recipient, with the server's code), not who."""
        caplog.set_level(logging.DEBUG)
        smtp_server.refused.add("gone@example.com")
        place(ledger, email="gone@example.com", reference="GONE-1")
        catch_up()
        (row,) = outbox_rows(effects_service.engine)
        settings = DispatchSettings(max_attempts=2, backoff_base=0.01, backoff_cap=0.02)
        settle(make_dispatcher(settings, smtp=smtp_server.settings), effects_service.engine)

        history = attempt_rows(effects_service.engine, row["id"])
        assert [a["outcome"] for a in history] == ["failed", "dead"]
        for attempt in history:
            assert "recipient refused" in attempt["error"] and "550" in attempt["error"]
            assert "gone@" not in attempt["error"]
        assert "gone@" not in (effects_service.get(row["id"]).last_error or "")
        # Every record of ours, fields included (the SMTP server's own log is the receiver's).
        ours = [vars(r) | {"text": r.getMessage()} for r in caplog.records]
        ours = [record for record in ours if record["name"].startswith("orderledger")]
        assert any("dead" in record["text"] for record in ours)
        assert "gone@" not in repr(ours)


class TestSmtpOutage:
    """An SMTP server that is down delays emails; it never loses them."""

    @pytest.mark.slow
    def test_emails_retry_while_the_server_is_down_and_arrive_once_it_is_up(
        self,
        ledger: OrderLedger,
        catch_up: CatchUp,
        smtp_server: SmtpServer,
        make_dispatcher: MakeDispatcher,
        effects_service: Effects,
    ) -> None:
        """Refused connections are failed attempts, retried until the server answers."""
        smtp_server.go_down()
        order_id = place(ledger, email="cy@example.com", reference="CY-7")
        catch_up()
        engine = effects_service.engine
        (row,) = outbox_rows(engine)
        settings = DispatchSettings(
            max_attempts=50, backoff_base=0.02, backoff_cap=0.2, idle_wait=0.01
        )
        dispatcher = make_dispatcher(settings, smtp=smtp_server.settings)
        dispatcher.start()

        wait_for(
            lambda: len(attempt_rows(engine, row["id"])) >= 3, "three failed attempts", timeout=15
        )
        assert smtp_server.received() == []
        smtp_server.come_up()
        wait_for(lambda: smtp_server.received() != [], "the email to arrive", timeout=15)
        wait_for(
            lambda: effects_service.get(row["id"]).status == DELIVERED,
            "the effect delivered",
            timeout=10,
        )
        dispatcher.stop()

        (email,) = smtp_server.received()
        assert email.message["Subject"] == "Your order CY-7 is placed"
        assert email.message["Message-ID"] == f"<{row['id']}@orderledger>"
        assert row["id"] == effect_id(
            "email:OrderPlaced", _position(ledger, order_id, "OrderPlaced")
        )
        history = attempt_rows(engine, row["id"])
        failures, last = history[:-1], history[-1]
        assert len(failures) >= 3
        assert all(a["outcome"] == "failed" and "Refused" in a["error"] for a in failures)
        assert last["outcome"] == DELIVERED
