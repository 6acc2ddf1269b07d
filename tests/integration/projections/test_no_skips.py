"""PostgreSQL writers commit in parallel, without a table lock: readers never skip an event.

A lower position may commit after a higher one. Projections read in (transaction id,
position) order and only up to the safe head, so they apply every event exactly once, each
order's versions in order. A naive reader that tails ``position > P`` is kept beside them as
the control: it is seen to skip, so these tests would see a skip if the engine made one.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from typing import Any
from uuid import UUID

import psycopg
import pytest
from sqlalchemy import select, text

from domain.eventstore import Checkpoint, StoreFromAnotherClusterError, reached_at
from domain.ledger import OrderLedger
from domain.order import Order
from projections.engine.catalog import SERVING
from projections.engine.processor import ProcessorSettings
from projections.engine.runtime import ProjectionRuntime
from projections.engine.status import all_statuses
from tests.support.commits import (
    ROLL_BACK,
    TAKE_AN_ID,
    DeliveryLogProjection,
    HeldAppend,
    chaotic_writer,
    connect_beside,
    inside_appends,
)
from tests.support.engine import WAIT_TIMEOUT, only_generation, opened
from tests.support.stores import open_ledger_at

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

LOG = DeliveryLogProjection.name
ORDER: dict[str, Any] = {
    "customer_id": "c-1",
    "currency": "EUR",
    "lines": [{"sku": "S", "quantity": 1, "unit_price": 100}],
}


def delivered(runtime: ProjectionRuntime) -> list[tuple[int, str, int]]:
    """(position, aggregate id, version) of every applied event, in the order applied."""
    with runtime.reading(LOG) as (conn, tables):
        table = tables["delivery_log"]
        rows = conn.execute(
            select(table.c.position, table.c.order_id, table.c.version).order_by(table.c.seq)
        )
        return [(r.position, r.order_id, r.version) for r in rows]


def committed(ledger: OrderLedger) -> list[int]:
    """Every position the store holds."""
    with ledger.recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
        rows = conn.execute(
            f"SELECT notification_id FROM {ledger.recorder.events_table_name}"  # type: ignore[attr-defined]
            " ORDER BY notification_id"
        ).fetchall()
    return [row["notification_id"] for row in rows]


def assert_exactly_once_in_order(ledger: OrderLedger, runtime: ProjectionRuntime) -> None:
    log = delivered(runtime)
    assert sorted(p for p, _, _ in log) == committed(ledger)  # none missed, none twice
    versions: dict[str, int] = {}
    for _, aggregate, version in log:
        assert version == versions.get(aggregate, 0) + 1, f"{aggregate} out of order"
        versions[aggregate] = version


def steps(runtime: ProjectionRuntime, rounds: int = 5) -> None:
    """A few rounds of a worker, without waiting to catch up."""
    worker = runtime.worker()
    worker.prepare()
    try:
        for _ in range(rounds):
            worker.run_once()
    finally:
        worker.release_all()


def serving_checkpoint(runtime: ProjectionRuntime) -> Checkpoint:
    return only_generation(runtime, LOG, SERVING).checkpoint


class NaiveReader:
    """Tails the store by ``position > P`` in its own thread: the reader that skips."""

    def __init__(self, ledger: OrderLedger) -> None:
        self._ledger = ledger
        self._table = ledger.recorder.events_table_name  # type: ignore[attr-defined]
        self.seen: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> NaiveReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT_TIMEOUT)

    def poll(self, conn: psycopg.Connection[Any]) -> None:
        after = self.seen[-1] if self.seen else 0
        rows = conn.execute(
            f"SELECT notification_id FROM {self._table} WHERE notification_id > %s "
            "ORDER BY notification_id",
            (after,),
        ).fetchall()
        self.seen.extend(row[0] for row in rows)

    def _run(self) -> None:
        with connect_beside(self._ledger) as conn:
            while not self._stop.wait(0.002):
                self.poll(conn)
            self.poll(conn)


def two_orders_at_once(ledger: OrderLedger) -> None:
    """Two new orders' events saved by one transaction."""
    ledger.save(Order.place(**ORDER), Order.place(**ORDER))


class TestDeterministicCases:
    def test_a_lower_position_committing_after_a_higher_one_is_applied_once(
        self, postgres_url: str
    ) -> None:
        with opened(postgres_url, [DeliveryLogProjection()]) as (ledger, runtime):
            with HeldAppend(ledger, lambda: ledger.place_order(**ORDER)) as held:
                later = ledger.place_order(**ORDER)
                naive = NaiveReader(ledger)
                with connect_beside(ledger) as conn:
                    naive.poll(conn)
                    steps(runtime)
                    # Committed, but a transaction that began before it is still running.
                    assert delivered(runtime) == []
                    held.release()
                    naive.poll(conn)
            low = held.result.position
            assert low < later.position
            assert naive.seen == [later.position]  # the naive reader skipped the lower one

            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert [p for p, _, _ in delivered(runtime)] == [low, later.position]
            assert_exactly_once_in_order(ledger, runtime)

    def test_a_transaction_that_took_its_id_early_is_read_first_once_it_commits(
        self, postgres_url: str
    ) -> None:
        """Its id comes before a later transaction's, its position after: read by id."""
        with opened(postgres_url, [DeliveryLogProjection()]) as (ledger, runtime):
            early = HeldAppend(ledger, lambda: ledger.place_order(**ORDER), take_id_first=True)
            with early:
                other = ledger.place_order(**ORDER)
                steps(runtime)
                assert delivered(runtime) == []
            assert early.error is None
            assert early.result.position > other.position

            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert [p for p, _, _ in delivered(runtime)] == [early.result.position, other.position]
            assert_exactly_once_in_order(ledger, runtime)

    def test_rolled_back_positions_leave_gaps_that_stall_nothing(self, postgres_url: str) -> None:
        with opened(postgres_url, [DeliveryLogProjection()]) as (ledger, runtime):
            first = ledger.place_order(**ORDER)
            with inside_appends(ledger, lambda: ROLL_BACK), pytest.raises(Exception) as failed:
                ledger.place_order(**ORDER)
            assert isinstance(failed.value.__cause__ or failed.value, Exception)
            last = ledger.place_order(**ORDER)
            assert last.position > first.position + 1  # the rolled-back position is a gap

            started = time.monotonic()
            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert time.monotonic() - started < 5
            assert [p for p, _, _ in delivered(runtime)] == [first.position, last.position]
            assert serving_checkpoint(runtime).position == last.position

    def test_an_idle_writer_session_is_ended_by_its_timeout_and_readers_resume(
        self, postgres_url: str
    ) -> None:
        """A writer session that took an id and went idle holds every reader back, until the
        server ends it (idle_in_transaction_session_timeout, 5 s on the ledger's sessions)."""
        with opened(postgres_url, [DeliveryLogProjection()]) as (ledger, runtime):
            datastore = ledger.recorder.datastore  # type: ignore[attr-defined]
            with datastore.get_connection() as stuck:
                stuck.autocommit = False
                stuck.execute("SELECT pg_current_xact_id()")
                placed = ledger.place_order(**ORDER)
                steps(runtime)
                assert delivered(runtime) == []
                time.sleep(1)
                # Operators see how long it has held the projections.
                (status,) = all_statuses(runtime.catalog, runtime.source)
                assert status.oldest_transaction_seconds >= 1
                assert status.lag_events == 1
                started = time.monotonic()

                runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

                waited = time.monotonic() - started
                with pytest.raises(psycopg.Error, match="idle-in-transaction timeout"):
                    stuck.execute("SELECT 1")
                stuck.close()
            assert [p for p, _, _ in delivered(runtime)] == [placed.position]
            assert waited < 15

    def test_transactions_of_several_events_across_pages_of_one_event(
        self, postgres_url: str
    ) -> None:
        """Two orders saved together are two events in one transaction; pages hold one."""
        with opened(postgres_url, [DeliveryLogProjection()], batch_size=1) as (ledger, runtime):
            with HeldAppend(ledger, lambda: two_orders_at_once(ledger)) as held:
                two_orders_at_once(ledger)
                ledger.place_order(**ORDER)
                steps(runtime, rounds=3)
                assert delivered(runtime) == []
            assert held.error is None
            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            log = [p for p, _, _ in delivered(runtime)]
            assert len(log) == 5
            assert log[:2] == sorted(log[:2])  # the held transaction's two events, together
            assert_exactly_once_in_order(ledger, runtime)

    def test_read_your_writes_waits_for_the_transactions_before_the_write(
        self, postgres_url: str
    ) -> None:
        """A position is reached at its event's checkpoint: once every transaction that
        began before it has ended and the event is applied. A gap is reached at the safe head."""
        with opened(postgres_url, [DeliveryLogProjection()]) as (ledger, runtime):
            with HeldAppend(ledger, lambda: ledger.place_order(**ORDER)) as held:
                mine = ledger.place_order(**ORDER)
                target = reached_at(ledger.store, mine.position)
                assert target == ledger.store.checkpoint_at(mine.position)
                steps(runtime)
                assert serving_checkpoint(runtime) < target
            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)
            assert serving_checkpoint(runtime) >= target
            assert held.result.position in [p for p, _, _ in delivered(runtime)]

            with inside_appends(ledger, lambda: ROLL_BACK), pytest.raises(Exception):  # noqa: B017
                ledger.place_order(**ORDER)
            gap = mine.position + 2
            assert ledger.store.checkpoint_at(gap) is None
            assert reached_at(ledger.store, gap) == runtime.source.safe_head()


class TestAppendTransactions:
    def test_no_append_transaction_takes_an_id_before_its_insert(self, postgres_url: str) -> None:
        """A statement trigger on the events table refuses an INSERT whose transaction already
        has an id; every command still records, and a transaction that took one is refused."""
        with opened(postgres_url, [DeliveryLogProjection()]) as (ledger, runtime):
            table = ledger.recorder.events_table_name  # type: ignore[attr-defined]
            with runtime.engine.begin() as conn:
                conn.execute(
                    text(
                        "CREATE FUNCTION no_early_id() RETURNS trigger LANGUAGE plpgsql AS $$ "
                        "BEGIN IF pg_current_xact_id_if_assigned() IS NOT NULL THEN "
                        "RAISE EXCEPTION 'transaction id taken before the INSERT'; END IF; "
                        "RETURN NULL; END $$"
                    )
                )
                conn.execute(
                    text(
                        f"CREATE TRIGGER no_early_id BEFORE INSERT ON {table} "
                        "FOR EACH STATEMENT EXECUTE FUNCTION no_early_id()"
                    )
                )
            placed = ledger.place_order(**ORDER, shipping_address="1 Road", customer_email="a@b.c")
            order = placed.order_id
            ledger.add_line(order, sku="T", quantity=1, unit_price=50)
            ledger.capture_payment(order, amount=150, payment_reference="p", idempotency_key="k")
            ledger.ship_order(order, carrier="DHL", tracking_number="1")
            ledger.deliver_order(order)
            other = ledger.place_order(**ORDER).order_id
            ledger.cancel_order(other, reason="asked")
            ledger.erase_customer("c-1", reason="asked")

            with (
                inside_appends(ledger, lambda: TAKE_AN_ID),
                pytest.raises(Exception, match="taken before the INSERT"),
            ):
                ledger.place_order(**ORDER)

    def test_each_orders_later_versions_have_later_transaction_ids(self, postgres_url: str) -> None:
        with opened(postgres_url, [DeliveryLogProjection()]) as (ledger, _):
            order = ledger.place_order(**ORDER).order_id
            for number in range(3):
                ledger.capture_payment(order, amount=1, payment_reference=f"p{number}")
            stored = ledger.store.select_aggregate_notifications(order)
            assert [n.originator_version for n in stored] == [1, 2, 3, 4]
            assert [n.tx for n in stored] == sorted({n.tx for n in stored})
            assert all(n.tx > 0 for n in stored)


class TestARandomisedHarness:
    SEEDS = (11, 23, 37)
    WRITERS = 8
    COMMANDS = 30

    def test_every_event_is_applied_exactly_once_in_order_and_the_naive_reader_skips(
        self, postgres_url: str
    ) -> None:
        """Eight writer processes per seed (held transactions, rollbacks, lost races retried),
        a worker restarted from its saved checkpoint at random moments, pages of 1-50."""
        skipped_by_naive = 0
        with opened(postgres_url, [DeliveryLogProjection()]) as (ledger, runtime):
            hot = [ledger.place_order(**ORDER).order_id for _ in range(3)]
            for seed in self.SEEDS:
                rng = random.Random(seed)
                with NaiveReader(ledger) as naive:
                    self._round(postgres_url, runtime, rng, seed, hot)
                    runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)
                skipped_by_naive += len(set(committed(ledger)) - set(naive.seen))
                assert_exactly_once_in_order(ledger, runtime)
        assert skipped_by_naive > 0, "the naive reader never skipped: the harness has no teeth"

    def _round(
        self,
        url: str,
        runtime: ProjectionRuntime,
        rng: random.Random,
        seed: int,
        hot: list[UUID],
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Barrier(self.WRITERS)
        writers = [
            ctx.Process(
                target=chaotic_writer,
                args=(url, seed * 100 + n, self.COMMANDS, hot, ready),
            )
            for n in range(self.WRITERS)
        ]
        for process in writers:
            process.start()
        try:
            while any(p.is_alive() for p in writers):
                settings = ProcessorSettings(batch_size=rng.randint(1, 50))
                worker = runtime.worker(settings=settings, idle_wait=0.01)
                worker.start()
                time.sleep(rng.uniform(0.05, 0.6))
                worker.stop()  # restarts from the checkpoint it saved
        finally:
            for process in writers:
                process.join(WAIT_TIMEOUT)
        assert all(p.exitcode == 0 for p in writers)


class TestMigratingAStore:
    def test_a_store_of_the_locking_version_gets_transaction_ids_and_loses_nothing(
        self, postgres_url: str
    ) -> None:
        """Rows and checkpoints of the older version (position only) become (0, position)."""
        with opened(postgres_url, [DeliveryLogProjection()]) as (ledger, runtime):
            before = [ledger.place_order(**ORDER).position for _ in range(3)]
            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)
            table = ledger.recorder.events_table_name  # type: ignore[attr-defined]
            with runtime.engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE {table} DROP COLUMN tx_id"))
                conn.execute(text("ALTER TABLE projection_generations DROP COLUMN tx_id"))
        with opened(postgres_url, [DeliveryLogProjection()]) as (ledger, runtime):
            after = [ledger.place_order(**ORDER).position for _ in range(2)]
            assert serving_checkpoint(runtime) == Checkpoint(0, before[-1])
            stored = ledger.store.select_aggregate_notifications(
                ledger.place_order(**ORDER).order_id
            )
            assert stored[0].tx > 0

            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert [p for p, _, _ in delivered(runtime)][:5] == before + after
            assert_exactly_once_in_order(ledger, runtime)

    def test_a_store_restored_into_a_cluster_behind_its_ids_is_refused(
        self, postgres_url: str
    ) -> None:
        """Rows whose transaction ids this cluster has not reached (a pg_dump restored into
        another cluster) would put new events before them: the ledger refuses to open."""
        with opened(postgres_url, [DeliveryLogProjection()]) as (ledger, runtime):
            ledger.place_order(**ORDER)
            table = ledger.recorder.events_table_name  # type: ignore[attr-defined]
            with runtime.engine.begin() as conn:
                conn.execute(
                    text(
                        f"INSERT INTO {table} (originator_id, originator_version, topic, state,"
                        " tx_id) SELECT gen_random_uuid(), 1, topic, state, '999999999999'"
                        f" FROM {table} LIMIT 1"
                    )
                )
        with pytest.raises(StoreFromAnotherClusterError, match="restored from another cluster"):
            open_ledger_at(postgres_url)
