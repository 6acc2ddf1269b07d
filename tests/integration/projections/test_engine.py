"""The projection engine's core guarantees: exactly once per position, fenced leases, no stalls.

Every test runs a real worker or processor against a real SQLite file and a real PostgreSQL
database. The counting projection inserts one row per applied position under a primary key,
so a position applied twice cannot hide and a position skipped shows as a missing row.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import queue
import time

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError

from domain.eventstore import START, reached_at
from domain.ledger import OrderLedger
from domain.order import Order
from projections.engine.catalog import LeaseLostError
from projections.engine.processor import Outcome, Processor, ProcessorSettings
from projections.engine.runtime import ProjectionRuntime
from projections.engine.source import SharedReads
from tests.support.engine import (
    WAIT_TIMEOUT,
    AppliedPositionsProjection,
    PaymentsOnlyProjection,
    applied_positions,
    at_position,
    crash_mid_batch_process,
    only_generation,
    opened,
    place_and_pay,
    race_worker_process,
    starting_process,
    store_events,
)
from tests.support.waiting import wait_for

COUNTING = AppliedPositionsProjection.name


def store_positions(ledger: OrderLedger) -> list[int]:
    return [recorded.position for recorded in store_events(ledger)]


def serving_position(runtime: ProjectionRuntime, name: str = COUNTING) -> int:
    return only_generation(runtime, name, "serving").position


def stale_and_thief(
    runtime: ProjectionRuntime, batch_size: int
) -> tuple[Processor, Processor, int]:
    """A processor that applies one batch under a lease that expires at once, and a second
    processor (another owner) that takes the lease over as soon as it has expired."""
    projection = runtime.projection(COUNTING)
    generation = only_generation(runtime, COUNTING, "serving").generation
    stale = Processor(
        runtime.catalog,
        runtime.source,
        projection,
        generation,
        "stale-owner",
        ProcessorSettings(batch_size=batch_size, lease_ttl=0.001),
    )
    thief = Processor(
        runtime.catalog,
        runtime.source,
        projection,
        generation,
        "thief-owner",
        ProcessorSettings(batch_size=batch_size, lease_ttl=60.0),
    )
    return stale, thief, generation


def payment_positions(ledger: OrderLedger) -> list[int]:
    """The store positions of every PaymentCaptured event."""
    return [
        recorded.position
        for recorded in store_events(ledger)
        if isinstance(recorded.event, Order.PaymentCaptured)
    ]


def payments_only_rows(runtime: ProjectionRuntime) -> list[int]:
    """The positions payments_only applied, in order."""
    with runtime.reading(PaymentsOnlyProjection.name) as (conn, tables):
        table = tables["payments_only"]
        return [row.position for row in conn.execute(table.select().order_by("position"))]


class TestExactlyOncePerPosition:
    """Each committed position is applied once, with its position, in one transaction."""

    @pytest.mark.parametrize("read_ahead", [False, True], ids=["in-turn", "reading-ahead"])
    def test_every_position_is_applied_once_across_many_small_batches(
        self, store_url: str, read_ahead: bool
    ) -> None:
        """Sixty events in batches of seven, then more: one row per store position, at the head.

        Reading the next batch while one commits changes nothing of what is applied.
        """
        with opened(store_url, [AppliedPositionsProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 30)
            settings = ProcessorSettings(batch_size=7, read_ahead=read_ahead)
            worker = runtime.worker(settings=settings)
            worker.run_until_caught_up(timeout=WAIT_TIMEOUT)
            assert applied_positions(runtime) == store_positions(ledger)
            assert len(applied_positions(runtime)) == 60

            # More events after catching up, applied by a second run over the same rows.
            place_and_pay(ledger, 5, prefix="late")
            worker.run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert applied_positions(runtime) == store_positions(ledger)
            assert serving_position(runtime) == ledger.head_position() == 70

    def test_a_failing_handler_keeps_only_the_events_before_it_and_the_position_there(
        self, store_url: str
    ) -> None:
        """The handler writes its row and raises at position 13: rows 1-12 and position 12 stay."""
        projection = AppliedPositionsProjection(fail_on=at_position(13))
        with opened(store_url, [projection], batch_size=5) as (ledger, runtime):
            place_and_pay(ledger, 10)

            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            # Batches (0,5] and (5,10] committed; of (10,15] only 11 and 12, before the failure.
            assert applied_positions(runtime) == list(range(1, 13))
            assert serving_position(runtime) == 12

    def test_a_crash_mid_batch_leaves_nothing_of_that_batch_and_a_restart_applies_it_once(
        self, store_url: str
    ) -> None:
        """A worker process killed inside a batch: the batch vanishes; the next worker redoes it."""
        with opened(store_url, [AppliedPositionsProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 10)
            runtime.worker().prepare()
            ctx = multiprocessing.get_context("spawn")
            reached = ctx.Event()
            process = ctx.Process(target=crash_mid_batch_process, args=(store_url, 13, 5, reached))
            process.start()
            try:
                # The handler of position 13 has written rows 11-13 of its batch: kill it there.
                assert reached.wait(WAIT_TIMEOUT), "the worker process never reached position 13"
                process.kill()
                process.join(WAIT_TIMEOUT)
            finally:
                if process.is_alive():
                    process.kill()
                    process.join()

            assert applied_positions(runtime) == list(range(1, 11))
            assert serving_position(runtime) == 10

            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert applied_positions(runtime) == store_positions(ledger)
            assert serving_position(runtime) == ledger.head_position()


class TestCompareAndSet:
    """Two workers on one projection: the lease and the position's compare-and-set fence them."""

    def test_two_workers_in_threads_apply_every_position_exactly_once(
        self, store_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Leases expiring every few milliseconds: the workers keep taking over from each other."""
        caplog.set_level(logging.WARNING, logger="orderledger.projections")
        with opened(store_url, [AppliedPositionsProjection()], batch_size=5, lease_ttl=0.02) as (
            ledger,
            runtime,
        ):
            place_and_pay(ledger, 100)
            head = ledger.head_position()
            runtime.worker().prepare()
            workers = [runtime.worker(owner=f"thread-{n}") for n in range(2)]
            for worker in workers:
                worker.start()
            try:
                wait_for(
                    lambda: serving_position(runtime) >= head,
                    "the workers caught up",
                    timeout=WAIT_TIMEOUT,
                )
            finally:
                for worker in workers:
                    worker.stop()

            assert applied_positions(runtime) == store_positions(ledger)
            assert serving_position(runtime) == head
        failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert failures == []

    def test_two_worker_processes_apply_every_position_exactly_once(self, store_url: str) -> None:
        """Two processes racing with short leases: one row per position, position at the head."""
        with opened(store_url, [AppliedPositionsProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 100)
            head = ledger.head_position()
            runtime.worker().prepare()
            ctx = multiprocessing.get_context("spawn")
            ready = ctx.Barrier(2)
            results = ctx.Queue()
            processes = [
                ctx.Process(
                    target=race_worker_process,
                    args=(store_url, f"process-{n}", 0.02, head, ready, results),
                )
                for n in range(2)
            ]
            for process in processes:
                process.start()
            reports = []
            try:
                reports = [results.get(timeout=WAIT_TIMEOUT) for _ in processes]
            except queue.Empty:
                pytest.fail(f"the worker processes did not finish; got {reports}")
            finally:
                for process in processes:
                    process.join(WAIT_TIMEOUT)
                    if process.is_alive():
                        process.kill()
                        process.join()
            assert [process.exitcode for process in processes] == [0, 0]

            assert applied_positions(runtime) == store_positions(ledger)
            assert serving_position(runtime) == head
            assert [(errors, messages) for _, errors, messages in reports] == [(0, [])] * 2

    def test_a_live_lease_keeps_another_owner_out(self, store_url: str) -> None:
        """While one processor holds the lease, another owner's step applies nothing."""
        with opened(store_url, [AppliedPositionsProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 3)
            runtime.worker().prepare()
            holder, other, _ = stale_and_thief(runtime, batch_size=2)
            holder.settings = ProcessorSettings(batch_size=2, lease_ttl=60.0)

            assert holder.step().outcome is Outcome.APPLIED
            assert other.step().outcome is Outcome.BUSY_ELSEWHERE

            assert applied_positions(runtime) == [1, 2]
            assert serving_position(runtime) == 2

    def test_a_processor_whose_lease_was_taken_over_commits_nothing(self, store_url: str) -> None:
        """Another owner acquired the expired lease (epoch bumped): the old holder is fenced."""
        with opened(store_url, [AppliedPositionsProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 6)
            runtime.worker().prepare()
            stale, _, generation = stale_and_thief(runtime, batch_size=4)
            assert stale.step().outcome is Outcome.APPLIED
            assert stale.lease is not None
            stale_epoch = stale.lease.epoch

            taken: list[object] = []

            def take_over() -> bool:
                lease = runtime.catalog.acquire(COUNTING, generation, "thief-owner", 60.0)
                taken.append(lease)
                return lease is not None

            wait_for(take_over, "the first lease expired and was taken over", timeout=WAIT_TIMEOUT)

            result = stale.step()

            assert result.outcome is Outcome.LOST
            assert stale.lease is None
            assert applied_positions(runtime) == [1, 2, 3, 4]
            row = only_generation(runtime, COUNTING, "serving")
            assert (row.position, row.lease_owner, row.lease_epoch) == (
                4,
                "thief-owner",
                stale_epoch + 1,
            )

    def test_a_fenced_processor_is_told_it_lost_the_lease_even_when_the_new_holder_moved_on(
        self, store_url: str
    ) -> None:
        """The new holder already applied the next batch: the old one gets LOST, not FAILED.

        The old holder's batch re-inserts positions the new holder committed; it must learn it
        was fenced (and re-acquire later), not take the duplicate key for a handler's failure
        and stop for good.
        """
        with opened(store_url, [AppliedPositionsProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 6)
            runtime.worker().prepare()
            stale, thief, _ = stale_and_thief(runtime, batch_size=4)
            assert stale.step().outcome is Outcome.APPLIED

            outcomes: list[Outcome] = []

            def thief_steps() -> bool:
                outcomes.append(thief.step().outcome)
                return outcomes[-1] is Outcome.APPLIED

            wait_for(thief_steps, "the new holder applied a batch", timeout=WAIT_TIMEOUT)
            assert applied_positions(runtime) == list(range(1, 9))

            outcome = stale.step().outcome

            assert outcome is Outcome.LOST
            assert not stale.failed
            assert applied_positions(runtime) == list(range(1, 9))
            assert serving_position(runtime) == 8

    def test_the_fence_is_checked_in_the_same_transaction_as_the_rows(self, store_url: str) -> None:
        """advance() inside a transaction whose lease was taken raises and the rows roll back."""
        with opened(store_url, [AppliedPositionsProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 2)
            runtime.worker().prepare()
            stale, _, generation = stale_and_thief(runtime, batch_size=2)
            assert stale.step().outcome is Outcome.APPLIED
            assert stale.lease is not None
            wait_for(
                lambda: (
                    runtime.catalog.acquire(COUNTING, generation, "thief-owner", 60.0) is not None
                ),
                "the lease was taken over",
                timeout=WAIT_TIMEOUT,
            )
            second = reached_at(ledger.store, 2)
            batch = runtime.source.read(second, 10, runtime.projection(COUNTING).topics)

            with pytest.raises(LeaseLostError):  # noqa: SIM117 - the rollback is the point
                with runtime.engine.begin() as conn:
                    runtime.projection(COUNTING).apply(
                        conn, runtime.catalog.tables(COUNTING, generation), batch.events
                    )
                    runtime.catalog.advance(conn, stale.lease, second, batch.checkpoint, 1.0)

            assert applied_positions(runtime) == [1, 2]


class TestReadingAhead:
    """A batch read ahead is applied only where the commit before it left the position."""

    def test_a_batch_read_ahead_is_not_applied_when_the_commit_stops_short(
        self, store_url: str
    ) -> None:
        """The handler fails at 13 while (15, 20] is read ahead: rows 1-12 and position 12 stay."""
        projection = AppliedPositionsProjection(fail_on=at_position(13))
        with opened(store_url, [projection]) as (ledger, runtime):
            place_and_pay(ledger, 10)

            settings = ProcessorSettings(batch_size=5, read_ahead=True)
            runtime.worker(settings=settings).run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert applied_positions(runtime) == list(range(1, 13))
            assert serving_position(runtime) == 12


class TestSharedReads:
    """Projections of one worker share reads and still get exactly their own events."""

    def test_each_projection_gets_its_own_events_up_to_the_shared_checkpoint(
        self, store_url: str
    ) -> None:
        """Read together with every event, payments_only gets each payment once, in order."""
        projections = [AppliedPositionsProjection(), PaymentsOnlyProjection()]
        with opened(store_url, projections) as (ledger, runtime):
            paid = place_and_pay(ledger, 12)
            for order_id in paid[:3]:
                ledger.cancel_order(order_id, reason="customer asked")
            everything = runtime.projection(COUNTING).topics
            payments = runtime.projection(PaymentsOnlyProjection.name).topics
            alone = runtime.source.read(START, 1000, payments).events

            seen = []
            after = START
            while after < runtime.source.safe_head():
                reads = SharedReads(runtime.source, [everything, payments])
                mine = reads.read(after, 5, payments)
                shared = reads.read(after, 5, everything)
                assert [r.position for r in shared.events] == [
                    r.position for r in runtime.source.read(after, 5, everything).events
                ]
                assert mine.checkpoint == shared.checkpoint > after
                seen.extend(r.position for r in mine.events)
                after = mine.checkpoint

            assert seen == [r.position for r in alone]
            assert len(seen) == 12

    def test_a_worker_of_two_projections_applies_each_its_own_events(self, store_url: str) -> None:
        """One worker, two projections, batches of four: each table equals its events."""
        projections = [AppliedPositionsProjection(), PaymentsOnlyProjection()]
        with opened(store_url, projections, batch_size=4) as (ledger, runtime):
            place_and_pay(ledger, 9)

            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert applied_positions(runtime) == store_positions(ledger)
            rows = payments_only_rows(runtime)
            assert rows == payment_positions(ledger)
            assert serving_position(runtime, PaymentsOnlyProjection.name) == ledger.head_position()


class TestPositionsAdvance:
    """Positions move past events a projection ignores and past permanent gaps."""

    def test_a_projection_that_ignores_most_events_still_reaches_the_head(
        self, store_url: str
    ) -> None:
        """payments_only sees only PaymentCaptured and still ends at the head, past other events."""
        with opened(store_url, [PaymentsOnlyProjection()], batch_size=3) as (ledger, runtime):
            paid = place_and_pay(ledger, 8)
            # The newest events are all of types it ignores.
            for order_id in paid[:3]:
                ledger.cancel_order(order_id, reason="customer asked")
            place_and_pay(ledger, 4, prefix="unpaid", pay=False)

            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            rows = payments_only_rows(runtime)
            assert rows == payment_positions(ledger)
            assert len(rows) == 8
            assert serving_position(runtime, PaymentsOnlyProjection.name) == ledger.head_position()

    @pytest.mark.postgres
    def test_a_permanent_gap_in_positions_is_passed(self, postgres_url: str) -> None:
        """A save that lost a version race consumed a position; the projection moves past it."""
        with opened(postgres_url, [AppliedPositionsProjection()], batch_size=2) as (
            ledger,
            runtime,
        ):
            (order_id,) = place_and_pay(ledger, 1, pay=False)
            winner = ledger.get_order(order_id)
            loser = ledger.get_order(order_id)
            winner.capture_payment(amount=100, payment_reference="first")
            ledger.save(winner)
            loser.capture_payment(amount=100, payment_reference="second")
            with pytest.raises(IntegrityError):
                ledger.save(loser)
            place_and_pay(ledger, 2, prefix="after")

            positions = store_positions(ledger)
            assert positions == [1, 2, 4, 5, 6, 7], "the failed save should have left a gap"

            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert applied_positions(runtime) == positions
            assert serving_position(runtime) == ledger.head_position() == 7

    @pytest.mark.postgres
    def test_a_gap_left_by_a_rolled_back_insert_is_passed(self, postgres_url: str) -> None:
        """A transaction that inserted an event then rolled back leaves a hole that is skipped."""
        with opened(postgres_url, [AppliedPositionsProjection()], batch_size=100) as (
            ledger,
            runtime,
        ):
            place_and_pay(ledger, 1)
            with psycopg.connect(postgres_url) as conn:
                conn.execute(
                    "INSERT INTO orderledger_events"
                    " (originator_id, originator_version, topic, state)"
                    " SELECT gen_random_uuid(), originator_version, topic, state"
                    " FROM orderledger_events ORDER BY notification_id LIMIT 1"
                )
                conn.rollback()
            place_and_pay(ledger, 1, prefix="after")

            positions = store_positions(ledger)
            assert positions == [1, 2, 4, 5]

            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert applied_positions(runtime) == positions
            assert serving_position(runtime) == 5

    def test_an_empty_store_leaves_the_projection_at_zero_and_idle(self, store_url: str) -> None:
        """With no events the worker catches up at once at position 0."""
        with opened(store_url, [AppliedPositionsProjection()]) as (ledger, runtime):
            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert ledger.head_position() == 0
            assert serving_position(runtime) == 0
            assert applied_positions(runtime) == []


class TestLivePasses:
    """Once at the head, a worker applies what arrived since its last pass."""

    def test_on_sqlite_live_passes_start_at_most_once_per_poll_interval(
        self, sqlite_url: str
    ) -> None:
        """A steady stream of commands: each pass gathers what came since the one before."""
        with opened(sqlite_url, [AppliedPositionsProjection()]) as (ledger, runtime):
            worker = runtime.worker(idle_wait=0.05)
            assert worker.gather == runtime.source.poll_interval
            worker.gather = 0.1
            starts: list[float] = []
            run_once = worker.run_once

            def counted() -> bool:
                starts.append(time.monotonic())
                return run_once()

            worker.run_once = counted  # type: ignore[method-assign]
            worker.start()
            try:
                streamed_until = time.monotonic() + 1.0
                while time.monotonic() < streamed_until:
                    place_and_pay(ledger, 1, pay=False)
                head = ledger.head_position()
                wait_for(
                    lambda: serving_position(runtime) >= head,
                    "the worker caught up",
                    timeout=WAIT_TIMEOUT,
                )
            finally:
                worker.stop()

            assert applied_positions(runtime) == store_positions(ledger)
            gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
            assert len(gaps) >= 5
            assert min(gaps) >= 0.1 - 0.002, f"passes began {min(gaps) * 1000:.1f} ms apart"

    def test_on_postgres_a_notified_worker_passes_at_once(self, postgres_url: str) -> None:
        with opened(postgres_url, [AppliedPositionsProjection()]) as (_ledger, runtime):
            assert runtime.source.server_side
            assert runtime.worker().gather == 0.0


class TestStopping:
    IDLE_WAIT = 20.0

    def test_an_idle_worker_stops_at_once_not_after_its_idle_wait(self, store_url: str) -> None:
        """Waiting for events, it notices the stop within a poll (it slept out its whole idle
        wait before: half a second per stop in the default settings)."""
        with opened(store_url, [AppliedPositionsProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 1)
            worker = runtime.worker(idle_wait=self.IDLE_WAIT)
            worker.start()
            head = ledger.head_position()
            wait_for(lambda: serving_position(runtime) >= head, "the worker caught up", timeout=10)
            time.sleep(0.2)  # into its wait for more events
            started = time.monotonic()
            worker.stop(timeout=self.IDLE_WAIT)
            assert time.monotonic() - started < self.IDLE_WAIT / 4


class TestLagHistory:
    """Workers record each serving projection's lag once a minute, kept for an hour."""

    def test_a_worker_records_the_lag_of_what_it_serves(self, store_url: str) -> None:
        with opened(store_url, [AppliedPositionsProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 3)
            worker = runtime.worker()
            worker.lag_sample_every = 0.0
            worker.run_until_caught_up(timeout=WAIT_TIMEOUT)

            sample = runtime.catalog.lag_history(time.time())[COUNTING][-1]

            assert int(time.time() // 60) - sample.minute in (0, 1)
            assert (sample.lag_events, sample.lag_seconds) == (0, 0.0)

    def test_one_sample_a_minute_and_none_older_than_an_hour(self, store_url: str) -> None:
        with opened(store_url, [AppliedPositionsProjection()]) as (_, runtime):
            catalog, now = runtime.catalog, time.time()
            catalog.record_lag(COUNTING, now - 3600, 9, 9.0)
            catalog.record_lag(COUNTING, now - 60, 5, 2.5)
            catalog.record_lag(COUNTING, now, 7, 1.0)
            catalog.record_lag(COUNTING, now, 3, 0.5)  # the same minute: the last one stays

            samples = catalog.lag_history(now)[COUNTING]

            assert [(s.lag_events, s.lag_seconds) for s in samples] == [(5, 2.5), (3, 0.5)]
            assert [s.minute for s in samples] == [int(now // 60) - 1, int(now // 60)]


class TestStartingTogether:
    STARTING = 4

    def test_processes_starting_at_once_on_a_new_store_all_start(self, store_url: str) -> None:
        """Four processes opening a store that has no tables yet: each one creates or finds
        every table, none fails (SQLite refused the losers with "database is locked")."""
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Barrier(self.STARTING)
        results = ctx.Queue()
        processes = [
            ctx.Process(target=starting_process, args=(store_url, ready, results))
            for _ in range(self.STARTING)
        ]
        for process in processes:
            process.start()
        try:
            failures = [results.get(timeout=WAIT_TIMEOUT) for _ in processes]
        finally:
            for process in processes:
                process.join(WAIT_TIMEOUT)
        assert [f for f in failures if f is not None] == []
