"""Gap safety: a worker tailing live while many writers commit applies every event exactly once.

Writers commit in parallel (processes on PostgreSQL, threads on SQLite), some of them racing on
one shared order so that lost races burn positions (permanent gaps on PostgreSQL). Afterwards
the live read models are compared with the store itself and with a rebuild from zero.
"""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import func, select

from domain.ledger import OrderLedger
from domain.order import Order
from projections.engine.runtime import ProjectionRuntime
from projections.order_summaries import OrderSummaryProjection
from tests.support.engine import (
    WAIT_TIMEOUT,
    AppliedPositionsProjection,
    applied_positions,
    checksum,
    only_generation,
    opened,
    serving_rows,
    store_events,
    write_orders,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

WRITERS = 8
ORDERS_PER_WRITER = 125
HOT_EVERY = 15
SUMMARIES = OrderSummaryProjection.name
COUNTING = AppliedPositionsProjection.name


def place_hot_order(ledger: OrderLedger) -> UUID:
    """The order every writer captures 1 on, big enough for all of them."""
    return ledger.place_order(
        customer_id="hot",
        currency="EUR",
        lines=[{"sku": "HOT", "quantity": 1, "unit_price": 10**6}],
    ).order_id


def run_writers_while_tailing(
    runtime: ProjectionRuntime, start_writers: Any, wait_for_writers: Any
) -> None:
    """A worker tails in its background thread while the writers run, then catches the head."""
    worker = runtime.worker()
    worker.start()
    try:
        start_writers()
        wait_for_writers()
        head = runtime.source.head()
        wait_for(
            lambda: all(
                only_generation(runtime, name, "serving").position >= head
                for name in (SUMMARIES, COUNTING)
            ),
            "the tailing worker reached the head",
            timeout=WAIT_TIMEOUT,
        )
    finally:
        worker.stop()


def assert_every_event_applied_exactly_once(
    ledger: OrderLedger, runtime: ProjectionRuntime
) -> None:
    events = store_events(ledger)
    expected_events = 1 + WRITERS * (
        2 * ORDERS_PER_WRITER + len(range(0, ORDERS_PER_WRITER, HOT_EVERY))
    )
    assert len(events) == expected_events
    assert ledger.head_position() == events[-1].position

    # The counting projection holds exactly the store's positions: none missed, none twice.
    assert applied_positions(runtime) == [recorded.position for recorded in events]

    # order_summaries agrees with the store's own counts.
    placed = [r for r in events if isinstance(r.event, Order.Placed)]
    captured = sum(r.event.amount for r in events if isinstance(r.event, Order.PaymentCaptured))
    with runtime.reading(SUMMARIES) as (conn, tables):
        table = tables["order_summaries"]
        rows, total_captured = conn.execute(select(func.count(), func.sum(table.c.captured))).one()
    assert rows == len(placed) == 1 + WRITERS * ORDERS_PER_WRITER
    assert total_captured == captured

    # ...and with a rebuild from event zero.
    _, live = serving_rows(runtime, SUMMARIES, "order_summaries")
    runtime.catalog.start_rebuild(SUMMARIES)
    runtime.worker(only=[SUMMARIES]).run_until_caught_up(timeout=WAIT_TIMEOUT)
    name, rebuilt = serving_rows(runtime, SUMMARIES, "order_summaries")
    assert name == "order_summaries_g2"
    assert checksum(rebuilt) == checksum(live)


@pytest.mark.postgres
def test_a_live_worker_applies_every_event_of_eight_writer_processes_once(
    postgres_url: str,
) -> None:
    """Eight writer processes on PostgreSQL: the tailing worker misses and repeats nothing."""
    projections = [OrderSummaryProjection(), AppliedPositionsProjection()]
    with opened(postgres_url, projections, batch_size=50) as (ledger, runtime):
        hot = place_hot_order(ledger)
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Barrier(WRITERS)
        writers = [
            ctx.Process(
                target=write_orders,
                args=(postgres_url, f"w{n}", ORDERS_PER_WRITER, ready, hot, HOT_EVERY),
            )
            for n in range(WRITERS)
        ]

        def start() -> None:
            for writer in writers:
                writer.start()

        def wait() -> None:
            for writer in writers:
                writer.join(WAIT_TIMEOUT * 2)

        try:
            run_writers_while_tailing(runtime, start, wait)
        finally:
            for writer in writers:
                if writer.is_alive():
                    writer.kill()
                    writer.join()
        assert [writer.exitcode for writer in writers] == [0] * WRITERS

        assert_every_event_applied_exactly_once(ledger, runtime)


def test_a_live_worker_applies_every_event_of_eight_writer_threads_once(sqlite_url: str) -> None:
    """Eight writer threads on one SQLite file: the tailing worker misses and repeats nothing."""
    projections = [OrderSummaryProjection(), AppliedPositionsProjection()]
    with opened(sqlite_url, projections, batch_size=50) as (ledger, runtime):
        hot = place_hot_order(ledger)
        ready = threading.Barrier(WRITERS)
        failures: list[BaseException] = []

        def write(n: int) -> None:
            try:
                write_orders(sqlite_url, f"w{n}", ORDERS_PER_WRITER, ready, hot, HOT_EVERY)
            except BaseException as error:
                failures.append(error)
                raise

        writers = [threading.Thread(target=write, args=(n,)) for n in range(WRITERS)]

        def start() -> None:
            for writer in writers:
                writer.start()

        def wait() -> None:
            for writer in writers:
                writer.join(WAIT_TIMEOUT * 2)

        run_writers_while_tailing(runtime, start, wait)
        assert failures == []
        assert not any(writer.is_alive() for writer in writers)

        assert_every_event_applied_exactly_once(ledger, runtime)
