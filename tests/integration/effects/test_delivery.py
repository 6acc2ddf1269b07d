"""Webhook effects: recorded once per event, signed, retried with backoff, ordered per order,
dead after the last attempt, and delivered once by competing dispatchers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path
from statistics import mean
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import IntegrityError

from api.bootstrap import open_read_models
from api.settings import Settings
from domain.ledger import OrderLedger
from projections.effects.dispatcher import DispatchSettings, backoff
from projections.effects.outbox import (
    CANCELLED,
    DEAD,
    DELIVERED,
    PENDING,
    OutboxProjection,
    effect_id,
)
from projections.effects.outbox import effects as effects_table
from projections.effects.senders import InvalidSignatureError, new_secret, sign, verify
from projections.effects.service import CreatedSubscription, Effects
from projections.engine.runtime import ProjectionRuntime
from projections.registry import all_projections
from tests import REPO_ROOT
from tests.support.commits import HeldAppend
from tests.support.effects import (
    CatchUp,
    MakeDispatcher,
    attempt_rows,
    deliver_until,
    outbox_rows,
    pay_and_ship,
    pending_count,
    place,
    settle,
)
from tests.support.projections import run_until_caught_up
from tests.support.receivers import LOCAL_TARGETS, SmtpServer, WebhookReceiver
from tests.support.stores import open_ledger_at
from tests.support.waiting import wait_for


def _keys(rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
    return {(row["effect"], row["position"]) for row in rows}


def _positions(ledger: OrderLedger, order_id: UUID) -> dict[str, int]:
    """Each event type of the order and its global position (types are unique per order here)."""
    return {entry.type: entry.position for entry in ledger.order_history(order_id)}


class TestRecording:
    """Each event records exactly the effects it triggers, once."""

    def test_each_event_records_a_webhook_per_matching_subscription_and_customer_emails(
        self, ledger: OrderLedger, effects_service: Effects, catch_up: CatchUp
    ) -> None:
        """Webhooks follow each subscription's event types; emails only placed/shipped/refunded."""
        everything = effects_service.add_subscription("http://127.0.0.1:9/all", ["*"])
        shipping = effects_service.add_subscription("http://127.0.0.1:9/ship", ["OrderShipped"])
        money = effects_service.add_subscription(
            "http://127.0.0.1:9/money", ["PaymentCaptured", "RefundIssued"]
        )
        with_email = place(ledger, email="ada@example.com")
        pay_and_ship(ledger, with_email)
        ledger.deliver_order(with_email)
        ledger.issue_refund(with_email, amount=500, reason="dented mug")
        without_email = place(ledger)
        ledger.cancel_order(without_email, reason="changed mind")

        catch_up()

        a = _positions(ledger, with_email)
        b = _positions(ledger, without_email)
        all_id, ship_id, money_id = (
            everything.subscription.id,
            shipping.subscription.id,
            money.subscription.id,
        )
        expected = {(f"webhook:{all_id}", p) for p in [*a.values(), *b.values()]}
        expected |= {(f"webhook:{ship_id}", a["OrderShipped"])}
        expected |= {
            (f"webhook:{money_id}", a["PaymentCaptured"]),
            (f"webhook:{money_id}", a["RefundIssued"]),
        }
        expected |= {
            ("email:OrderPlaced", a["OrderPlaced"]),
            ("email:OrderShipped", a["OrderShipped"]),
            ("email:RefundIssued", a["RefundIssued"]),
        }
        rows = outbox_rows(effects_service.engine)
        assert _keys(rows) == expected
        assert len(rows) == len(expected)
        urls = {
            all_id: "http://127.0.0.1:9/all",
            ship_id: "http://127.0.0.1:9/ship",
            money_id: "http://127.0.0.1:9/money",
        }
        for row in rows:
            assert row["id"] == effect_id(row["effect"], row["position"])
            assert row["status"] == PENDING
            kind, what = row["effect"].split(":", 1)
            assert row["kind"] == kind
            if kind == "webhook":
                assert row["target"] == urls[what]
            else:
                assert row["target"] == "email:cust-1"  # the customer, never the address
                assert row["event_type"] == what
                assert row["order_id"] == str(with_email)

    def test_a_subscription_created_later_gets_only_later_events(
        self, ledger: OrderLedger, effects_service: Effects, catch_up: CatchUp
    ) -> None:
        """Events recorded before a subscription existed never reach it."""
        early = effects_service.add_subscription("http://127.0.0.1:9/early", ["*"])
        before = place(ledger)
        ledger.capture_payment(before, amount=2500, payment_reference="p-1")
        late = effects_service.add_subscription("http://127.0.0.1:9/late", ["*"])
        after = place(ledger)
        ledger.cancel_order(before, reason="too slow")

        catch_up()

        rows = outbox_rows(effects_service.engine)
        late_positions = {
            r["position"] for r in rows if r["effect"] == f"webhook:{late.subscription.id}"
        }
        early_positions = {
            r["position"] for r in rows if r["effect"] == f"webhook:{early.subscription.id}"
        }
        cancelled = _positions(ledger, before)["OrderCancelled"]
        assert late_positions == {_positions(ledger, after)["OrderPlaced"], cancelled}
        assert early_positions == {
            *_positions(ledger, before).values(),
            *_positions(ledger, after).values(),
        }

    @pytest.mark.postgres
    def test_a_subscription_gets_what_commits_after_it_though_read_order_says_before(
        self, postgres_url: str
    ) -> None:
        """A writer still running holds readers back: an order committed just before the
        subscription lies past the safe head, and the held order commits after it with a
        lower transaction id. The subscription gets the held order's event, not the other."""
        ledger = open_ledger_at(postgres_url)
        runtime = open_read_models(Settings(database_url=postgres_url), ledger)
        try:
            service = Effects(runtime.engine, runtime.source, LOCAL_TARGETS)
            with HeldAppend(ledger, lambda: place(ledger)) as held:
                before = place(ledger)
                late = service.add_subscription("http://127.0.0.1:9/late", ["*"])
            after = held.result
            run_until_caught_up(runtime, ["outbox"])

            rows = outbox_rows(runtime.engine)
            late_positions = {
                r["position"] for r in rows if r["effect"] == f"webhook:{late.subscription.id}"
            }
            assert late_positions == {_positions(ledger, after)["OrderPlaced"]}
            # The held order took its position first: it comes first in read order too.
            assert min(late_positions) < _positions(ledger, before)["OrderPlaced"]
        finally:
            runtime.close()
            ledger.close()

    def test_the_database_holds_one_row_per_effect_and_position(
        self, ledger: OrderLedger, effects_service: Effects, catch_up: CatchUp
    ) -> None:
        """(effect, position) is unique in the table, and the database refuses a second row."""
        effects_service.add_subscription("http://127.0.0.1:9/a", ["*"])
        effects_service.add_subscription("http://127.0.0.1:9/b", ["OrderPlaced"])
        for n in range(4):
            order_id = place(ledger, email=f"c{n}@example.com")
            pay_and_ship(ledger, order_id)
        catch_up()

        engine = effects_service.engine
        with engine.connect() as conn:
            duplicates = list(
                conn.execute(
                    select(effects_table.c.effect, effects_table.c.position, func.count())
                    .group_by(effects_table.c.effect, effects_table.c.position)
                    .having(func.count() > 1)
                )
            )
            total = conn.execute(select(func.count()).select_from(effects_table)).scalar_one()
        assert duplicates == []
        # 4 orders x 3 events to "*", 4 placements to the second, 4 x (placed, shipped) emails.
        assert total == 12 + 4 + 8

        again = dict(outbox_rows(engine)[0])
        again["id"] = "00000000-0000-0000-0000-000000000000"
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(insert(effects_table).values(**again))

    def test_rebuilding_the_outbox_records_no_new_effects(
        self,
        ledger: OrderLedger,
        runtime: ProjectionRuntime,
        effects_service: Effects,
        catch_up: CatchUp,
        receiver: WebhookReceiver,
        smtp_server: SmtpServer,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        """A rebuilt outbox generation replays every event yet records and sends nothing again."""
        effects_service.add_subscription(receiver.url, ["*"])
        shipped_later = place(ledger, email="late@example.com")
        ledger.capture_payment(shipped_later, amount=2500, payment_reference="p-1")
        pay_and_ship(ledger, place(ledger, email="b@example.com"))
        catch_up()
        dispatcher = make_dispatcher(smtp=smtp_server.settings)
        settle(dispatcher, runtime.engine)
        assert len(receiver.accepted()) == 5
        assert len(smtp_server.received()) == 3
        before = outbox_rows(runtime.engine)
        serving = runtime.catalog.serving("outbox")
        assert serving is not None

        runtime.catalog.start_rebuild("outbox", target=ledger.head_position())
        catch_up()

        rebuilt = runtime.catalog.serving("outbox")
        assert rebuilt is not None and rebuilt.generation > serving.generation
        assert outbox_rows(runtime.engine) == before
        assert dispatcher.run_once() == 0
        assert len(receiver.received()) == 5
        assert len(smtp_server.received()) == 3

        # The rebuilt generation still knows each order's address: a later shipment emails.
        ledger.ship_order(shipped_later, carrier="UPS", tracking_number="T-9")
        catch_up()
        new = _keys(outbox_rows(runtime.engine)) - _keys(before)
        shipped_at = _positions(ledger, shipped_later)["OrderShipped"]
        webhook = next(r["effect"] for r in before if r["kind"] == "webhook")
        assert new == {("email:OrderShipped", shipped_at), (webhook, shipped_at)}

    def test_rebuilding_every_projection_records_no_new_effects(
        self,
        ledger: OrderLedger,
        runtime: ProjectionRuntime,
        effects_service: Effects,
        catch_up: CatchUp,
    ) -> None:
        """Rebuilding all read models together leaves the outbox exactly as it was."""
        effects_service.add_subscription("http://127.0.0.1:9/all", ["*"])
        for n in range(3):
            pay_and_ship(ledger, place(ledger, email=f"c{n}@example.com"))
        names = [p.name for p in runtime.projections]
        catch_up(names)
        before = outbox_rows(runtime.engine)
        assert len(before) == 3 * 3 + 3 * 2

        head = ledger.head_position()
        for name in names:
            runtime.catalog.start_rebuild(name, target=head)
        catch_up(names)

        for name in names:
            building = [r for r in runtime.catalog.rows(name) if r.role == "building"]
            assert building == [], f"{name} did not finish its rebuild"
        assert outbox_rows(runtime.engine) == before

    def test_a_new_outbox_version_records_no_new_effects(
        self,
        ledger: OrderLedger,
        runtime: ProjectionRuntime,
        store_url: str,
        effects_service: Effects,
        catch_up: CatchUp,
    ) -> None:
        """Code with a new outbox version rebuilds it, yet no effect is recorded twice."""

        class OutboxProjectionV2(OutboxProjection):
            version = 2

        effects_service.add_subscription("http://127.0.0.1:9/all", ["*"])
        pay_and_ship(ledger, place(ledger, email="a@example.com"))
        catch_up()
        before = outbox_rows(runtime.engine)
        assert len(before) == 3 + 2

        chosen = [p for p in all_projections() if p.name != "outbox"]
        upgraded = ProjectionRuntime.open(
            ledger, store_url, projections=[*chosen, OutboxProjectionV2()], poll_interval=0.02
        )
        try:
            run_until_caught_up(upgraded, ["outbox"])
            serving = upgraded.catalog.serving("outbox")
            assert serving is not None and serving.version == 2
            assert outbox_rows(runtime.engine) == before

            late = place(ledger, email="z@example.com")
            run_until_caught_up(upgraded, ["outbox"])
            new = _keys(outbox_rows(runtime.engine)) - _keys(before)
            placed_at = _positions(ledger, late)["OrderPlaced"]
            assert {position for _, position in new} == {placed_at}
            assert len(new) == 2  # the webhook and the email, once each
        finally:
            upgraded.close()


class TestSubscribingWhileOrdersFlow:
    """A subscription gets every event after the position it starts from."""

    @pytest.mark.postgres
    @pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
    def test_an_event_recorded_while_a_subscription_is_added_reaches_it(
        self,
        store_url: str,
        ledger: OrderLedger,
        effects_service: Effects,
        catch_up: CatchUp,
    ) -> None:
        """The outbox running between the subscription's start and its commit loses nothing."""
        engine = effects_service.engine
        place(ledger)
        catch_up()
        created: list[CreatedSubscription] = []
        with engine.connect() as blocker:
            # Hold the subscription's INSERT back so the outbox runs inside its window.
            blocker.execute(text("LOCK TABLE webhook_subscriptions IN EXCLUSIVE MODE"))
            adding = threading.Thread(
                target=lambda: created.append(
                    effects_service.add_subscription("http://127.0.0.1:9/all", ["*"])
                )
            )
            adding.start()
            wait_for(lambda: _waiting_for_lock(engine) == 1, "the subscription to wait", timeout=10)
            concurrent = place(ledger)
            # The outbox may finish, or wait for the subscription if it serialises with it, or
            # not read the new event yet: the subscription's transaction began before it, so
            # readers pass it only once that transaction ends.
            outbox = threading.Thread(target=catch_up)
            outbox.start()
            wait_for(
                lambda: (
                    not outbox.is_alive()
                    or _waiting_for_lock(engine) == 2
                    or ledger.store.safe_head() < ledger.store.last_committed()
                ),
                "the outbox to run or to wait for the subscription",
                timeout=20,
            )
            blocker.rollback()
        adding.join(10)
        outbox.join(30)
        assert not adding.is_alive() and not outbox.is_alive()
        (subscription,) = [c.subscription for c in created]
        catch_up()

        placed_at = _positions(ledger, concurrent)["OrderPlaced"]
        assert placed_at > subscription.created_position
        recorded = _keys(outbox_rows(engine))
        # reconcile() records what the outbox should hold: in a healthy system, nothing.
        found_missing = effects_service.reconcile()
        assert (f"webhook:{subscription.id}", placed_at) in recorded, (
            f"the event never reached the subscription; reconcile() recorded {found_missing}"
        )
        assert found_missing == 0


def _waiting_for_lock(engine: Any) -> int:
    """How many other sessions wait for a lock in this database."""
    with engine.connect() as conn:
        waiting: int = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            )
        ).scalar_one()
    return waiting


class TestSignatures:
    """Receivers can check that a webhook is ours and unchanged."""

    def test_every_delivery_verifies_with_the_subscription_secret(
        self,
        ledger: OrderLedger,
        effects_service: Effects,
        catch_up: CatchUp,
        receiver: WebhookReceiver,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        """Each request carries a valid signature, and its body describes the recorded effect."""
        created = effects_service.add_subscription(receiver.url, ["*"])
        for _ in range(3):
            pay_and_ship(ledger, place(ledger))
        catch_up()
        rows = {row["id"]: row for row in outbox_rows(effects_service.engine)}

        settle(make_dispatcher(), effects_service.engine)

        requests = receiver.received()
        assert sorted(r.webhook_id for r in requests) == sorted(rows)
        for request in requests:
            verify(created.secret, request.headers, request.body)
            row = rows[request.webhook_id]
            document = request.document
            assert document["id"] == row["id"]
            assert document["type"] == row["event_type"]
            assert document["order_id"] == row["order_id"]
            assert document["position"] == row["position"]
            assert request.headers["webhook-signature"].startswith("v1,")

    def test_a_tampered_body_or_a_wrong_secret_fails_verification(
        self,
        ledger: OrderLedger,
        effects_service: Effects,
        catch_up: CatchUp,
        receiver: WebhookReceiver,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        """Changing one byte of the body or the id, or checking with another secret, fails."""
        created = effects_service.add_subscription(receiver.url, ["OrderPlaced"])
        place(ledger)
        catch_up()
        settle(make_dispatcher(), effects_service.engine)
        (request,) = receiver.received()
        verify(created.secret, request.headers, request.body)

        document = request.document
        document["data"]["currency"] = "USD"
        tampered = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
        assert tampered != request.body
        with pytest.raises(InvalidSignatureError):
            verify(created.secret, request.headers, tampered)
        with pytest.raises(InvalidSignatureError):
            verify(new_secret(), request.headers, request.body)
        other_id = {**request.headers, "webhook-id": effect_id("webhook:x", 1)}
        with pytest.raises(InvalidSignatureError):
            verify(created.secret, other_id, request.body)
        stale = {**request.headers, "webhook-timestamp": str(int(time.time()) - 3600)}
        with pytest.raises(InvalidSignatureError):
            verify(created.secret, stale, request.body)

    def test_the_webhook_id_is_the_effect_id_on_every_retry(
        self,
        ledger: OrderLedger,
        effects_service: Effects,
        catch_up: CatchUp,
        receiver: WebhookReceiver,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        """A receiver failing the first attempt sees the same webhook-id and body again."""
        receiver.fail_first = 1
        created = effects_service.add_subscription(receiver.url, ["*"])
        order_id = place(ledger)
        ledger.capture_payment(order_id, amount=2500, payment_reference="p-1")
        catch_up()

        settle(make_dispatcher(), effects_service.engine)

        rows = outbox_rows(effects_service.engine)
        assert len(rows) == 2
        for row in rows:
            seen = [r for r in receiver.received() if r.webhook_id == row["id"]]
            assert [r.status for r in seen] == [500, 204]
            assert seen[0].body == seen[1].body
            for request in seen:
                verify(created.secret, request.headers, request.body)
            assert row["status"] == DELIVERED
            history = attempt_rows(effects_service.engine, row["id"])
            assert [(a["outcome"], a["status_code"]) for a in history] == [
                ("failed", 500),
                (DELIVERED, 204),
            ]


class TestVerifyingSignatures:
    @pytest.mark.parametrize(
        "header",
        ["", "garbage", "v1", "v1,", ",abc", "v1 v1", "\t"],
        ids=["empty", "no-comma", "scheme-only", "empty-signature", "no-scheme", "two", "blank"],
    )
    def test_a_malformed_signature_header_is_an_invalid_signature(self, header: str) -> None:
        """Whatever arrives in the header, the receiver's check says invalid, never crashes."""
        secret, now = new_secret(), str(int(time.time()))
        headers = {"webhook-id": "msg_1", "webhook-timestamp": now, "webhook-signature": header}
        with pytest.raises(InvalidSignatureError, match="signature"):
            verify(secret, headers, b"{}")

    def test_only_the_v1_scheme_is_accepted(self) -> None:
        """The right HMAC under another scheme's name is not a v1 signature."""
        secret, now = new_secret(), int(time.time())
        signature = sign(secret, "msg_1", now, b"{}").removeprefix("v1,")
        headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now)}
        verify(secret, {**headers, "webhook-signature": f"v1,{signature}"}, b"{}")
        verify(secret, {**headers, "webhook-signature": f"v1a,x v1,{signature}"}, b"{}")
        with pytest.raises(InvalidSignatureError, match="no v1 signature"):
            verify(secret, {**headers, "webhook-signature": f"v2,{signature}"}, b"{}")


class TestBackoff:
    """Failed attempts wait longer and longer, with full jitter, up to a cap."""

    def test_backoff_is_full_jitter_under_a_doubling_capped_ceiling(self) -> None:
        """Waits are uniform in [0, min(cap, base * 2^(n-1))]: the mean doubles until the cap."""
        settings = DispatchSettings(backoff_base=0.5, backoff_cap=30.0)
        rng = random.Random(20240330)
        means = []
        for attempt in range(1, 11):
            ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
            samples = [backoff(attempt, settings, rng) for _ in range(4000)]
            assert min(samples) >= 0.0
            assert max(samples) <= ceiling
            assert max(samples) > 0.98 * ceiling  # the ceiling itself is reached, not lower
            assert min(samples) < 0.02 * ceiling  # and waits go all the way down
            assert mean(samples) == pytest.approx(ceiling / 2, rel=0.05)
            means.append(mean(samples))
        # 0.5, 1, 2, 4, 8, 16 then capped at 30: doubling, then flat.
        for earlier, later in pairwise(means[:6]):
            assert later / earlier == pytest.approx(2.0, rel=0.1)
        assert means[6] / means[5] == pytest.approx(30 / 16, rel=0.1)
        for capped in means[7:]:
            assert capped == pytest.approx(means[6], rel=0.1)

    def test_the_same_seed_gives_the_same_waits(self) -> None:
        """Jitter draws from the random source it is given."""
        settings = DispatchSettings(backoff_base=1.0, backoff_cap=60.0)
        first = [backoff(n, settings, random.Random(5)) for n in range(1, 8)]
        second = [backoff(n, settings, random.Random(5)) for n in range(1, 8)]
        assert first == second

    @pytest.mark.slow
    def test_each_retry_waits_within_its_ceiling_and_never_starts_early(
        self,
        ledger: OrderLedger,
        effects_service: Effects,
        catch_up: CatchUp,
        receiver: WebhookReceiver,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        """Recorded attempt times show each wait inside [0, min(cap, base * 2^(n-1))]."""
        settings = DispatchSettings(
            max_attempts=6, backoff_base=0.1, backoff_cap=0.6, idle_wait=0.01
        )
        ceilings = [min(0.6, 0.1 * 2 ** (n - 1)) for n in range(1, 6)]
        assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.6, 0.6])
        receiver.go_down()
        effects_service.add_subscription(receiver.url, ["OrderPlaced"])
        for _ in range(3):
            place(ledger)
        catch_up()
        engine = effects_service.engine
        dispatcher = make_dispatcher(settings)
        # Retry deadlines as each attempt left them: (effect id, attempt) -> (due, seen by).
        due: dict[tuple[str, int], tuple[float, float]] = {}

        def all_dead() -> bool:
            return all(row["status"] == DEAD for row in outbox_rows(engine))

        deadline = time.monotonic() + 25
        while not all_dead():
            assert time.monotonic() < deadline, "effects did not go dead in time"
            if dispatcher.run_once() == 0:
                time.sleep(0.005)
                continue
            seen_by = time.time()
            for row in outbox_rows(engine):
                if row["status"] == PENDING and row["attempts"] > 0:
                    due.setdefault((row["id"], row["attempts"]), (row["next_attempt_at"], seen_by))

        slack = 0.005  # SQLite's clock has millisecond resolution
        for row in outbox_rows(engine):
            history = attempt_rows(engine, row["id"])
            assert [a["outcome"] for a in history] == ["failed"] * 5 + ["dead"]
            for n in range(1, 6):
                ended = history[n - 1]["started_at"] + history[n - 1]["duration_ms"] / 1000
                next_started = history[n]["started_at"]
                retry_at, seen_by = due[(row["id"], n)]
                ceiling = ceilings[n - 1]
                # The wait began after the attempt ended and before the test looked.
                assert retry_at >= ended - slack
                assert retry_at - seen_by <= ceiling + slack
                # The next attempt never starts before its time.
                assert next_started >= retry_at - slack
        assert receiver.received() == []


class TestOutage:
    """A receiver that is down gets everything once it comes back."""

    @pytest.mark.slow
    def test_every_delivery_arrives_after_the_receiver_comes_back(
        self,
        ledger: OrderLedger,
        effects_service: Effects,
        catch_up: CatchUp,
        receiver: WebhookReceiver,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        """Attempts fail while the socket is closed and succeed once it is open again."""
        receiver.go_down()
        effects_service.add_subscription(receiver.url, ["*"])
        for _ in range(5):
            pay_and_ship(ledger, place(ledger))
        catch_up()
        engine = effects_service.engine
        settings = DispatchSettings(
            max_attempts=50, backoff_base=0.02, backoff_cap=0.2, idle_wait=0.01
        )
        dispatcher = make_dispatcher(settings)
        dispatcher.start()

        first = {r["id"] for r in outbox_rows(engine) if r["order_version"] == 1}
        wait_for(
            lambda: all(len(attempt_rows(engine, i)) >= 3 for i in first),
            "three failed attempts of each first effect",
            timeout=15,
        )
        receiver.come_up()
        wait_for(lambda: pending_count(engine) == 0, "every effect delivered", timeout=20)
        dispatcher.stop()

        rows = outbox_rows(engine)
        assert len(rows) == 15
        assert {row["status"] for row in rows} == {DELIVERED}
        assert Counter(receiver.accepted_ids()) == Counter({row["id"]: 1 for row in rows})
        for effect in first:
            failures = [a for a in attempt_rows(engine, effect) if a["outcome"] == "failed"]
            assert len(failures) >= 3
            assert all(a["status_code"] is None and a["error"] for a in failures)


class TestFlakyReceiver:
    """A receiver failing at random still gets everything, each order in position order."""

    @pytest.mark.slow
    def test_random_failures_are_retried_and_each_order_arrives_in_position_order(
        self,
        ledger: OrderLedger,
        effects_service: Effects,
        catch_up: CatchUp,
        receiver: WebhookReceiver,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        """With 40% of requests refused, every effect is accepted once and never out of order."""
        receiver.fail_fraction = 0.4
        effects_service.add_subscription(receiver.url, ["*"])
        orders = [place(ledger) for _ in range(8)]
        for order_id in orders:
            pay_and_ship(ledger, order_id)
            ledger.deliver_order(order_id)
        catch_up()
        engine = effects_service.engine
        settings = DispatchSettings(max_attempts=40, backoff_base=0.01, backoff_cap=0.05)

        settle(make_dispatcher(settings), engine, timeout=25)

        rows = outbox_rows(engine)
        assert len(rows) == 8 * 4
        assert {row["status"] for row in rows} == {DELIVERED}
        assert Counter(receiver.accepted_ids()) == Counter({row["id"]: 1 for row in rows})
        assert any(r.status == 503 for r in receiver.received())
        for order_id in orders:
            expected = [r["position"] for r in rows if r["order_id"] == str(order_id)]
            mine = [
                r.document["position"]
                for r in receiver.received()
                if r.document["order_id"] == str(order_id)
            ]
            # Retries repeat a position; a later one never comes before an earlier is accepted.
            assert sorted(set(mine)) == expected
            assert mine == sorted(mine), f"order {order_id} arrived out of order: {mine}"


class TestPoisonedOrder:
    """An order its receiver keeps refusing goes dead without holding up other orders."""

    @pytest.mark.parametrize("how", ["retry_all_dead", "retry"])
    def test_a_refused_order_goes_dead_waits_then_delivers_in_order_after_a_retry(
        self,
        how: str,
        ledger: OrderLedger,
        effects_service: Effects,
        catch_up: CatchUp,
        receiver: WebhookReceiver,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        """Dead after max attempts, every attempt kept; later effects wait; a retry frees them."""
        settings = DispatchSettings(max_attempts=3, backoff_base=0.02, backoff_cap=0.05)
        effects_service.add_subscription(receiver.url, ["*"])
        poisoned = place(ledger)
        healthy = [place(ledger) for _ in range(2)]
        pay_and_ship(ledger, poisoned)
        for order_id in healthy:
            pay_and_ship(ledger, order_id)
        receiver.failing_orders = {str(poisoned)}
        catch_up()
        engine = effects_service.engine
        dispatcher = make_dispatcher(settings)
        rows = outbox_rows(engine)
        poisoned_rows = [r for r in rows if r["order_id"] == str(poisoned)]
        first, *later = poisoned_rows
        assert [r["event_type"] for r in poisoned_rows] == [
            "OrderPlaced",
            "PaymentCaptured",
            "OrderShipped",
        ]

        def stuck() -> bool:
            statuses = {r["id"]: r["status"] for r in outbox_rows(engine)}
            healthy_done = all(
                statuses[r["id"]] == DELIVERED for r in rows if r["order_id"] != str(poisoned)
            )
            return healthy_done and statuses[first["id"]] == DEAD

        deliver_until(dispatcher, stuck)
        # More passes change nothing: the later effects wait behind the dead one.
        for _ in range(5):
            dispatcher.run_once()

        dead = effects_service.get(first["id"])
        assert dead.status == DEAD
        assert dead.last_error == "HTTP 500"
        assert [(a["attempt"], a["outcome"], a["status_code"]) for a in dead.history] == [
            (1, "failed", 500),
            (2, "failed", 500),
            (3, "dead", 500),
        ]
        assert all(a["error"] == "HTTP 500" and a["started_at"] > 0 for a in dead.history)
        for row in later:
            waiting = effects_service.get(row["id"])
            assert waiting.status == PENDING
            assert waiting.total_attempts == 0
            assert waiting.history == []
        refused = {r.webhook_id for r in receiver.received() if r.status == 500}
        assert refused == {first["id"]}
        assert effects_service.counts() == {PENDING: 2, DELIVERED: 6, DEAD: 1, CANCELLED: 0}

        # The receiver is fixed and the operator retries.
        receiver.failing_orders = set()
        if how == "retry_all_dead":
            assert effects_service.retry_all_dead() == 1
        else:
            assert effects_service.retry(first["id"]).status == PENDING
        settle(dispatcher, engine)

        assert effects_service.counts() == {PENDING: 0, DELIVERED: 9, DEAD: 0, CANCELLED: 0}
        delivered = [r for r in receiver.accepted() if r.document["order_id"] == str(poisoned)]
        assert [r.document["position"] for r in delivered] == [r["position"] for r in poisoned_rows]
        assert [r.webhook_id for r in delivered] == [r["id"] for r in poisoned_rows]
        history = effects_service.get(first["id"]).history
        assert [a["outcome"] for a in history] == ["failed", "failed", "dead", DELIVERED]

    def test_retrying_one_targets_dead_letters_leaves_the_others_dead(
        self,
        ledger: OrderLedger,
        effects_service: Effects,
        catch_up: CatchUp,
        receiver: WebhookReceiver,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        """Two endpoints go dead; retrying one target's dead letters sends only those again."""
        settings = DispatchSettings(max_attempts=1, backoff_base=0.01, backoff_cap=0.02)
        one, other = receiver.url, f"{receiver.url}/other"
        for url in (one, other):
            effects_service.add_subscription(url, ["OrderPlaced"])
        receiver.status = 500
        for _ in range(2):
            place(ledger)
        catch_up()
        dispatcher = make_dispatcher(settings)
        settle(dispatcher, effects_service.engine)
        dead = {target: counts[DEAD] for target, counts in effects_service.by_destination().items()}
        assert dead == {one: 2, other: 2}

        receiver.status = 204
        assert effects_service.retry_all_dead(target=one) == 2
        settle(dispatcher, effects_service.engine)

        assert effects_service.by_destination()[one][DEAD] == 0
        assert effects_service.by_destination()[other][DEAD] == 2
        assert effects_service.counts()[DELIVERED] == 2
        retried = {r["id"] for r in outbox_rows(effects_service.engine) if r["target"] == one}
        assert {r.webhook_id for r in receiver.accepted()} == retried


# -- competing dispatchers -----------------------------------------------------------------------


def _orders_with_webhooks(
    ledger: OrderLedger, effects_service: Effects, receiver: WebhookReceiver, orders: int
) -> None:
    effects_service.add_subscription(receiver.url, ["*"])
    for _ in range(orders):
        pay_and_ship(ledger, place(ledger))


def _assert_each_delivered_once(engine: Any, receiver: WebhookReceiver, expected: int) -> None:
    rows = outbox_rows(engine)
    assert len(rows) == expected
    assert {row["status"] for row in rows} == {DELIVERED}
    received = Counter(r.webhook_id for r in receiver.received())
    assert received == Counter({row["id"]: 1 for row in rows})
    for row in rows:
        assert [a["outcome"] for a in attempt_rows(engine, row["id"])] == [DELIVERED]


class TestCompetingDispatchers:
    """Dispatchers sharing one outbox never deliver an effect twice."""

    @pytest.mark.slow
    def test_two_dispatcher_threads_deliver_each_effect_once(
        self,
        ledger: OrderLedger,
        effects_service: Effects,
        catch_up: CatchUp,
        receiver: WebhookReceiver,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        """Two owners drain the outbox side by side; each webhook-id reaches the receiver once."""
        _orders_with_webhooks(ledger, effects_service, receiver, 20)
        catch_up()
        engine = effects_service.engine
        settings = DispatchSettings(batch_size=4, concurrency=4, idle_wait=0.01)
        one = make_dispatcher(settings, owner="dispatcher-one")
        two = make_dispatcher(settings, owner="dispatcher-two")
        one.start()
        two.start()
        wait_for(lambda: pending_count(engine) == 0, "every effect delivered", timeout=25)
        one.stop()
        two.stop()

        _assert_each_delivered_once(engine, receiver, 60)

    @pytest.mark.slow
    @pytest.mark.postgres
    @pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
    def test_two_dispatcher_processes_deliver_each_effect_once(
        self,
        store_url: str,
        ledger: OrderLedger,
        effects_service: Effects,
        catch_up: CatchUp,
        receiver: WebhookReceiver,
        tmp_path: Path,
    ) -> None:
        """Two OS processes claim with SKIP LOCKED; each webhook-id reaches the receiver once."""
        _orders_with_webhooks(ledger, effects_service, receiver, 20)
        catch_up()
        go = tmp_path / "go"
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", _DISPATCH_PROCESS, store_url, f"process-{n}", str(go)],
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in (1, 2)
        ]
        try:
            ready = [tmp_path / f"process-{n}.ready" for n in (1, 2)]
            wait_for(lambda: all(p.exists() for p in ready), "both processes ready", timeout=20)
            go.touch()
            outputs = [p.communicate(timeout=40) for p in processes]
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        for process, (_, err) in zip(processes, outputs, strict=True):
            assert process.returncode == 0, err
        attempted = [int(out.split()[-1]) for out, _ in outputs]
        assert sum(attempted) == 60

        _assert_each_delivered_once(effects_service.engine, receiver, 60)


_DISPATCH_PROCESS = """
import sys, time
from pathlib import Path
from domain.ledger import OrderLedger
from projections.effects.dispatcher import DispatchSettings
from api.bootstrap import build_dispatcher
from projections.effects.senders import SmtpSettings
from projections.effects.service import CreatedSubscription, Effects
from projections.engine.runtime import ProjectionRuntime
from tests.support.receivers import LOCAL_TARGETS
from tests.support.stores import open_ledger_at

url, owner, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
ledger = open_ledger_at(url)
runtime = ProjectionRuntime.open(ledger, url)
dispatcher = build_dispatcher(
    runtime, dispatch=DispatchSettings(batch_size=4, concurrency=4),
    smtp=SmtpSettings(), timeout=5.0, owner=owner, targets=LOCAL_TARGETS,
)
service = Effects(runtime.engine, runtime.source, LOCAL_TARGETS)
Path(str(go.parent / owner) + ".ready").touch()
deadline = time.monotonic() + 30
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.005)
attempted = 0
while service.counts()["pending"] and time.monotonic() < deadline:
    handled = dispatcher.run_once()
    attempted += handled
    if not handled:
        time.sleep(0.01)
dispatcher.stop()
runtime.close()
ledger.close()
print("attempted", attempted)
"""


class TestASlowReceiver:
    """A receiver that hangs holds only its own share of the workers, and only its own effects."""

    @pytest.mark.slow
    def test_a_hanging_receiver_delays_no_one_and_gets_each_effect_once_within_its_limit(
        self,
        store_url: str,
        ledger: OrderLedger,
        effects_service: Effects,
        catch_up: CatchUp,
        tmp_path: Path,
    ) -> None:
        """It hangs 3 s, longer than the 1 s claim; two dispatcher processes share the outbox.

        The fast receiver gets all its effects before the slow one answers once; the slow one
        never has more requests open than the per-target limit and sees each effect once.
        """
        orders = 4
        slow, fast = WebhookReceiver(), WebhookReceiver()
        slow.hang = 3.0
        for receiver in (slow, fast):
            receiver.come_up()
            effects_service.add_subscription(receiver.url, ["*"])
        try:
            for _ in range(orders):
                place(ledger)
            catch_up()
            go, stop = tmp_path / "go", tmp_path / "stop"
            processes = [
                subprocess.Popen(
                    [sys.executable, "-c", _SERVING_DISPATCHER, store_url, owner, str(tmp_path)],
                    cwd=_ROOT,
                    env={**os.environ, "PYTHONPATH": str(_ROOT)},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for owner in ("one", "two")
            ]
            try:
                ready = [tmp_path / f"{owner}.ready" for owner in ("one", "two")]
                wait_for(
                    lambda: all(p.exists() for p in ready), "both dispatchers ready", timeout=30
                )
                go.touch()
                engine = effects_service.engine
                wait_for(lambda: pending_count(engine) == 0, "every effect delivered", timeout=60)
            finally:
                stop.touch()
                outputs = [p.communicate(timeout=30) for p in processes]
            for process, (_, err) in zip(processes, outputs, strict=True):
                assert process.returncode == 0, err
        finally:
            slow.close()
            fast.close()

        first_slow_answer = min(r.answered_at for r in slow.received())
        assert len(fast.accepted()) == orders
        assert max(r.answered_at for r in fast.received()) < first_slow_answer
        slow_ids = Counter(r.webhook_id for r in slow.received())
        assert sorted(slow_ids.values()) == [1] * orders
        assert _most_at_once(slow.received()) == _SLOW_PER_TARGET


def _most_at_once(requests: list[Any]) -> int:
    """The largest number of requests the receiver held open at one moment."""
    edges = sorted(
        [(r.received_at, 1) for r in requests] + [(r.answered_at, -1) for r in requests],
        key=lambda edge: (edge[0], edge[1]),
    )
    open_now = most = 0
    for _, change in edges:
        open_now += change
        most = max(most, open_now)
    return most


_ROOT = REPO_ROOT
_SLOW_PER_TARGET = 2

_SERVING_DISPATCHER = f"""
import sys, time
from pathlib import Path
from domain.ledger import OrderLedger
from projections.effects.dispatcher import DispatchSettings
from api.bootstrap import build_dispatcher
from projections.effects.senders import SmtpSettings
from projections.engine.runtime import ProjectionRuntime
from tests.support.receivers import LOCAL_TARGETS
from tests.support.stores import open_ledger_at

url, owner, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
ledger = open_ledger_at(url)
runtime = ProjectionRuntime.open(ledger, url)
settings = DispatchSettings(
    concurrency=4, per_target={_SLOW_PER_TARGET}, claim_ttl=1.0, idle_wait=0.02
)
dispatcher = build_dispatcher(
    runtime, dispatch=settings, smtp=SmtpSettings(), timeout=30.0, owner=owner,
    targets=LOCAL_TARGETS,
)
(folder / f"{{owner}}.ready").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
dispatcher.start()
while not (folder / "stop").exists():
    time.sleep(0.05)
dispatcher.stop()
runtime.close()
ledger.close()
"""
