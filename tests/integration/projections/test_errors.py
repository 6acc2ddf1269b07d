"""A handler that fails stops its projection exactly there, says why, and resumes once fixed."""

from __future__ import annotations

import threading
import time
from uuid import UUID

import psycopg
import pytest
from sqlalchemy import select

from domain.ledger import OrderLedger
from projections.engine.catalog import BUILDING, SERVING
from projections.engine.processor import Outcome
from projections.engine.runtime import ProjectionRuntime
from projections.engine.worker import Worker
from projections.order_summaries import OrderSummaryProjection
from tests.support.engine import (
    WAIT_TIMEOUT,
    AppliedPositionsProjection,
    PoisonedOrderSummaryProjection,
    applied_positions,
    at_position,
    generation_rows,
    only_generation,
    opened,
    place_and_pay,
    serving_rows,
    store_events,
)
from tests.support.waiting import wait_for

COUNTING = AppliedPositionsProjection.name
SUMMARIES = OrderSummaryProjection.name
POISON = 3
LINE = {"sku": "SKU-1", "quantity": 1, "unit_price": 250}


def two_orders_with_a_poisoned_payment(ledger: OrderLedger) -> tuple[UUID, UUID]:
    """A placed (1), B placed (2), A paid (3, the poison), B paid (4), C placed and paid (5, 6)."""
    first, second = place_and_pay(ledger, 2, prefix="p", pay=False)
    ledger.capture_payment(first, amount=100, payment_reference="pay-a")
    ledger.capture_payment(second, amount=200, payment_reference="pay-b")
    place_and_pay(ledger, 1, prefix="later")
    assert ledger.head_position() == 6
    return first, second


def release_after_catching_up(worker: Worker) -> None:
    """Catch up, then give the leases up as a stopping worker does."""
    worker.run_until_caught_up(timeout=WAIT_TIMEOUT)
    for processor in worker.processors.values():
        processor.release()


def summaries(runtime: ProjectionRuntime) -> dict[str, tuple[str, int]]:
    """Each order's (status, captured) as readers see it."""
    with runtime.reading(SUMMARIES) as (conn, tables):
        table = tables["order_summaries"]
        rows = conn.execute(select(table.c.order_id, table.c.status, table.c.captured))
        return {row.order_id: (row.status, row.captured) for row in rows}


class TestAPoisonEvent:
    """The first event a handler cannot apply."""

    def test_stops_the_projection_at_the_event_before_it(self, store_url: str) -> None:
        """Positions 1-2 applied in the failing batch; 3 and everything after it not."""
        with opened(store_url, [AppliedPositionsProjection(fail_on=at_position(POISON))]) as (
            ledger,
            runtime,
        ):
            two_orders_with_a_poisoned_payment(ledger)
            worker = runtime.worker()

            worker.run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert applied_positions(runtime) == [1, 2]
            assert only_generation(runtime, COUNTING, SERVING).position == 2
            # Running again does not skip the poison or apply anything past it.
            worker.run_once()
            assert applied_positions(runtime) == [1, 2]
            assert [p.step().outcome for p in worker.processors.values()] == [Outcome.FAILED]

    def test_is_recorded_with_position_event_type_message_and_time(self, store_url: str) -> None:
        """The catalog row names the failing event, what went wrong and when."""
        with opened(store_url, [AppliedPositionsProjection(fail_on=at_position(POISON))]) as (
            ledger,
            runtime,
        ):
            first, _ = two_orders_with_a_poisoned_payment(ledger)
            before = time.time()

            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            after = time.time()
            row = only_generation(runtime, COUNTING, SERVING)
            assert row.failed
            assert row.error_position == POISON
            assert row.error_event_id == f"{first}:2"
            assert row.error_event_type == "PaymentCaptured"
            assert row.error_message == "PoisonError: cannot apply position 3"
            assert row.error_at is not None
            # The database clock and ours are the same machine's; allow for rounding only.
            assert before - 1.0 <= row.error_at <= after + 1.0

    def test_keeps_a_later_event_of_another_order_out_of_the_read_model(
        self, store_url: str
    ) -> None:
        """order_summaries stopped on A's payment: both orders placed, neither payment applied."""
        poisoned = PoisonedOrderSummaryProjection(fail_on=at_position(POISON))
        with opened(store_url, [poisoned]) as (ledger, runtime):
            first, second = two_orders_with_a_poisoned_payment(ledger)

            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert summaries(runtime) == {
                str(first): ("pending_payment", 0),
                str(second): ("pending_payment", 0),
            }

    def test_a_restart_with_fixed_code_resumes_there_reaches_the_head_and_clears_the_error(
        self, store_url: str
    ) -> None:
        """A new worker with a working class of the same name and version applies 3..head once."""
        poisoned = AppliedPositionsProjection(fail_on=at_position(POISON))
        with opened(store_url, [poisoned]) as (ledger, runtime):
            two_orders_with_a_poisoned_payment(ledger)
            worker = runtime.worker()
            worker.start()
            try:
                wait_for(
                    lambda: only_generation(runtime, COUNTING, SERVING).failed,
                    "the poison event was recorded",
                    timeout=WAIT_TIMEOUT,
                )
            finally:
                worker.stop()
            assert applied_positions(runtime) == [1, 2]

        with opened(store_url, [AppliedPositionsProjection()]) as (ledger, runtime):
            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert applied_positions(runtime) == [r.position for r in store_events(ledger)]
            row = only_generation(runtime, COUNTING, SERVING)
            assert row.position == ledger.head_position() == 6
            assert not row.failed
            assert (row.error_event_id, row.error_message, row.error_at) == (None, None, None)

    def test_order_summaries_after_the_fix_match_a_projection_that_never_failed(
        self, store_url: str
    ) -> None:
        """Resuming after the poison gives the same rows as a clean rebuild from zero."""
        poisoned = PoisonedOrderSummaryProjection(fail_on=at_position(POISON))
        with opened(store_url, [poisoned]) as (ledger, runtime):
            first, second = two_orders_with_a_poisoned_payment(ledger)
            worker = runtime.worker()
            worker.start()
            try:
                wait_for(
                    lambda: only_generation(runtime, SUMMARIES, SERVING).failed,
                    "the poison event was recorded",
                    timeout=WAIT_TIMEOUT,
                )
            finally:
                worker.stop()

        with opened(store_url, [OrderSummaryProjection()]) as (ledger, runtime):
            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)
            assert summaries(runtime)[str(first)] == ("partially_paid", 100)
            assert summaries(runtime)[str(second)] == ("partially_paid", 200)
            _, resumed = serving_rows(runtime, SUMMARIES, "order_summaries")

            runtime.catalog.start_rebuild(SUMMARIES)
            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            name, rebuilt = serving_rows(runtime, SUMMARIES, "order_summaries")
            assert name == "order_summaries_g2"
            assert rebuilt == resumed


class TestAnErrorDuringARebuild:
    """A rebuild that hits a poison event fails; the serving generation is untouched by it."""

    def test_fails_the_rebuild_while_the_serving_generation_keeps_following(
        self, store_url: str
    ) -> None:
        """The building generation records the error; serving stays and follows new events."""
        with opened(store_url, [OrderSummaryProjection()]) as (ledger, runtime):
            first, _ = two_orders_with_a_poisoned_payment(ledger)
            release_after_catching_up(runtime.worker())
            _, served_before = serving_rows(runtime, SUMMARIES, "order_summaries")

        poisoned = PoisonedOrderSummaryProjection(fail_on=at_position(POISON))
        with opened(store_url, [poisoned], batch_size=100) as (ledger, runtime):
            building = runtime.catalog.start_rebuild(SUMMARIES, target=ledger.head_position())
            worker = runtime.worker()
            worker.run_until_caught_up(timeout=WAIT_TIMEOUT)

            failed = only_generation(runtime, SUMMARIES, BUILDING)
            assert failed.generation == building.generation == 2
            assert failed.error_position == POISON
            assert failed.error_event_id == f"{first}:2"
            assert failed.position == 2
            serving = only_generation(runtime, SUMMARIES, SERVING)
            assert (serving.generation, serving.failed) == (1, False)
            assert serving_rows(runtime, SUMMARIES, "order_summaries") == (
                "order_summaries_g1",
                served_before,
            )

            # New orders keep reaching readers through the serving generation.
            newcomers = place_and_pay(ledger, 3, prefix="new")
            worker.run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert only_generation(runtime, SUMMARIES, SERVING).position == ledger.head_position()
            seen = summaries(runtime)
            assert all(str(order_id) in seen for order_id in newcomers)
            assert len(seen) == 6
            still_failed = only_generation(runtime, SUMMARIES, BUILDING)
            assert (still_failed.position, still_failed.error_position) == (2, POISON)
            assert len(generation_rows(runtime, SUMMARIES, 2, "order_summaries")) == 2

    @pytest.mark.postgres
    def test_catching_up_after_it_failed_waits_for_the_serving_generation(
        self, postgres_url: str
    ) -> None:
        """A transaction of another session holds readers back while new orders arrive: the
        worker still ends with the serving generation at the head, not at the failure."""
        with opened(postgres_url, [OrderSummaryProjection()]) as (ledger, runtime):
            two_orders_with_a_poisoned_payment(ledger)
            release_after_catching_up(runtime.worker())

        poisoned = PoisonedOrderSummaryProjection(fail_on=at_position(POISON))
        with opened(postgres_url, [poisoned], batch_size=100) as (ledger, runtime):
            runtime.catalog.start_rebuild(SUMMARIES, target=ledger.head_position())
            worker = runtime.worker()
            worker.run_until_caught_up(timeout=WAIT_TIMEOUT)
            assert only_generation(runtime, SUMMARIES, BUILDING).failed

            with psycopg.connect(postgres_url) as holder:
                holder.execute("SELECT pg_current_xact_id()")  # readers wait for it to end
                ledger.place_order(customer_id="new", currency="EUR", lines=[LINE])
                threading.Timer(1.0, holder.rollback).start()

                worker.run_until_caught_up(timeout=WAIT_TIMEOUT)

            assert only_generation(runtime, SUMMARIES, SERVING).position == ledger.head_position()

    def test_a_fixed_worker_resumes_the_failed_rebuild_which_then_takes_over(
        self, store_url: str
    ) -> None:
        """Fixed code picks the failed generation up at its position, finishes it and serves it."""
        with opened(store_url, [OrderSummaryProjection()]) as (ledger, runtime):
            two_orders_with_a_poisoned_payment(ledger)
            release_after_catching_up(runtime.worker())
            _, served_before = serving_rows(runtime, SUMMARIES, "order_summaries")

        poisoned = PoisonedOrderSummaryProjection(fail_on=at_position(POISON))
        with opened(store_url, [poisoned]) as (ledger, runtime):
            runtime.catalog.start_rebuild(SUMMARIES)
            worker = runtime.worker()
            worker.start()
            try:
                wait_for(
                    lambda: only_generation(runtime, SUMMARIES, BUILDING).failed,
                    "the rebuild stopped on the poison event",
                    timeout=WAIT_TIMEOUT,
                )
            finally:
                worker.stop()

        with opened(store_url, [OrderSummaryProjection()]) as (ledger, runtime):
            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)

            rows = runtime.catalog.rows(SUMMARIES)
            assert [(r.generation, r.role, r.failed) for r in rows] == [(2, SERVING, False)]
            assert rows[0].position == ledger.head_position()
            assert serving_rows(runtime, SUMMARIES, "order_summaries") == (
                "order_summaries_g2",
                served_before,
            )
