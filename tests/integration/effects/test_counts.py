"""Effect counts per target and status, kept by the database: they equal a count of the outbox
after every kind of change, across folds, from an outbox that older versions filled, and under
concurrent writers."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select, text, update

from domain.eventstore import START
from domain.ledger import OrderLedger
from projections.effects import tally
from projections.effects.dispatcher import DispatchSettings
from projections.effects.outbox import (
    DEAD,
    DELIVERED,
    EMAIL,
    PENDING,
    STATUSES,
    destination_of,
    effect_id,
    insert_ignoring_duplicates,
    install_outbox,
)
from projections.effects.outbox import effects as effects_table
from projections.effects.service import Effects
from projections.effects.tally import changes, counts, fold_counts
from projections.engine.database import write_transaction
from tests.support.effects import CatchUp, MakeDispatcher, pay_and_ship, place
from tests.support.ports import free_port
from tests.support.receivers import WebhookReceiver


def counted_in_the_outbox(engine: Engine) -> dict[str, dict[str, int]]:
    """The truth the kept counts must equal: every outbox row, grouped."""
    destination = destination_of(effects_table)
    found: dict[str, dict[str, int]] = {}
    with engine.connect() as conn:
        for row in conn.execute(
            select(destination, effects_table.c.status, func.count()).group_by(
                destination, effects_table.c.status
            )
        ):
            found.setdefault(row[0], dict.fromkeys(STATUSES, 0))[row[1]] = int(row[2])
    return dict(sorted(found.items()))


def unfolded(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(changes)).scalar_one())


def forget_counting(engine: Engine) -> None:
    """Make the outbox look as an older version left it: no counting triggers or tables."""
    with write_transaction(engine) as conn:
        postgres = conn.dialect.name == "postgresql"
        for event in ("insert", "update", "delete"):
            name = f"outbox_effects_counted_{event}_v1"
            conn.execute(text(f"DROP TRIGGER {name}{' ON outbox_effects' if postgres else ''}"))
        for table in (counts, changes):
            table.drop(conn)


def _row(position: int, target: str, kind: str = "webhook") -> dict[str, Any]:
    return {
        "id": effect_id(f"{kind}:test", position),
        "effect": f"{kind}:test",
        "kind": kind,
        "position": position,
        "order_id": f"order-{position % 7}",
        "order_version": 1,
        "event_type": "OrderPlaced",
        "occurred_at": 0.0,
        "target": target,
        "status": "pending",
        "attempts": 0,
        "total_attempts": 0,
        "next_attempt_at": 0.0,
        "created_at": 0.0,
    }


class TestKeptCounts:
    def test_counts_equal_the_outbox_after_every_change(
        self,
        ledger: OrderLedger,
        effects_service: Effects,
        catch_up: CatchUp,
        receiver: WebhookReceiver,
        make_dispatcher: MakeDispatcher,
    ) -> None:
        """Recorded, delivered, dead, retried by target, emails by "email", and folded."""
        engine = effects_service.engine
        refusing, accepting = f"http://127.0.0.1:{free_port()}/hooks", receiver.url
        effects_service.add_subscription(refusing, ["*"])
        effects_service.add_subscription(accepting, ["OrderPlaced"])
        for index in range(3):
            order_id = place(ledger, email=f"buyer{index}@example.com")
        pay_and_ship(ledger, order_id)
        catch_up()

        recorded = effects_service.by_destination()
        assert recorded == counted_in_the_outbox(engine)
        assert (recorded[refusing][PENDING], recorded[EMAIL][PENDING]) == (5, 4)
        assert effects_service.counts()[PENDING] == 12

        # Nothing listens at ``refusing`` nor for mail: those go dead at their first attempt.
        # The shipped order's later effects to those wait behind its dead placement.
        dispatcher = make_dispatcher(DispatchSettings(max_attempts=1))
        while dispatcher.run_once():
            pass
        settled = effects_service.by_destination()
        assert settled == counted_in_the_outbox(engine)
        assert (settled[refusing][DEAD], settled[refusing][PENDING]) == (3, 2)
        assert (settled[EMAIL][DEAD], settled[EMAIL][PENDING]) == (3, 1)
        assert settled[accepting][DELIVERED] == 3

        assert effects_service.retry_all_dead(target=EMAIL) == 3
        assert effects_service.by_destination()[EMAIL] == {**settled[EMAIL], DEAD: 0, PENDING: 4}
        assert effects_service.retry_all_dead(target=refusing) == 3
        assert effects_service.by_destination() == counted_in_the_outbox(engine)

        before = effects_service.by_destination()
        fold_counts(engine)
        assert unfolded(engine) == 0
        assert effects_service.by_destination() == before == counted_in_the_outbox(engine)

    def test_an_outbox_an_older_version_filled_starts_from_its_rows(
        self, ledger: OrderLedger, effects_service: Effects, catch_up: CatchUp
    ) -> None:
        for _ in range(3):
            place(ledger, email="buyer@example.com")
        catch_up()
        forget_counting(effects_service.engine)

        install_outbox(effects_service.engine, START)

        assert effects_service.by_destination() == {
            EMAIL: {**dict.fromkeys(STATUSES, 0), "pending": 3}
        }
        place(ledger, email="buyer@example.com")
        catch_up()
        assert effects_service.counts()[PENDING] == 4

    def test_an_effect_recorded_again_is_counted_once(self, effects_service: Effects) -> None:
        """A rebuild records every effect again; the outbox ignores it, and so do the counts."""
        engine = effects_service.engine
        rows = [_row(position, "http://127.0.0.1:9/a") for position in (1, 2)]
        for _ in range(2):
            with write_transaction(engine) as conn:
                insert_ignoring_duplicates(conn, rows)

        assert effects_service.by_destination() == counted_in_the_outbox(engine)
        assert effects_service.counts()[PENDING] == 2

    def test_a_read_that_finds_a_backlog_folds_it_first(
        self, effects_service: Effects, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """No dispatcher has folded: the read folds, and its answer is the same."""
        engine = effects_service.engine
        with write_transaction(engine) as conn:
            for position in range(1, 31):  # one statement each: a change row each on PostgreSQL
                conn.execute(insert(effects_table), [_row(position, "http://127.0.0.1:9/a")])
        monkeypatch.setattr(tally, "READ_BACKLOG", 20)

        assert effects_service.by_destination() == counted_in_the_outbox(engine)
        assert unfolded(engine) == 0
        assert effects_service.counts()[PENDING] == 30

    def test_concurrent_writers_and_folds_never_lose_a_change(
        self, effects_service: Effects
    ) -> None:
        """Four writers move random effects between statuses while another thread folds."""
        engine = effects_service.engine
        targets = ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b", "email:cust-1"]
        rows = [
            _row(position, targets[position % 3], EMAIL if position % 3 == 2 else "webhook")
            for position in range(1, 301)
        ]
        with write_transaction(engine) as conn:
            conn.execute(insert(effects_table), rows)
        stop = threading.Event()
        failures: list[BaseException] = []

        def write(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(40):
                    chosen = [row["id"] for row in rng.sample(rows, rng.randint(1, 10))]
                    with write_transaction(engine) as conn:
                        conn.execute(
                            update(effects_table)
                            .where(effects_table.c.id.in_(chosen))
                            .values(status=rng.choice(STATUSES))
                        )
            except BaseException as error:  # reported by the test below
                failures.append(error)

        def fold() -> None:
            while not stop.is_set():
                fold_counts(engine)

        folder = threading.Thread(target=fold)
        writers = [threading.Thread(target=write, args=(seed,)) for seed in range(4)]
        folder.start()
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
        stop.set()
        folder.join()

        assert failures == []
        assert effects_service.by_destination() == counted_in_the_outbox(engine)
        fold_counts(engine)
        assert effects_service.by_destination() == counted_in_the_outbox(engine)
        assert sum(effects_service.counts().values()) == 300
