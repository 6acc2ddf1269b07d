"""Several real processes commanding the same order at once, on SQLite and PostgreSQL.

Each scenario starts worker processes (spawn context) that open their own ledger, wait for one
start signal and then send their command together. Meanwhile the test holds the store's write
lock, so every worker reads the same order state before any of them can write: the losers reach
the database with a stale version and go through the real conflict path, not the early check.
"""

from __future__ import annotations

import multiprocessing
import queue
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import psycopg
import pytest
from eventsourcing.utils import get_topic

from domain.errors import ConcurrencyConflictError
from domain.eventstore import event_store_env
from domain.ledger import OrderLedger
from domain.order import Order
from tests.support.stores import open_ledger_at

pytestmark = pytest.mark.slow

WORKERS = 8
STARTUP_TIMEOUT = 300.0
WORKER_TIMEOUT = 120.0

Outcome = tuple[str, Any]


def _run_command(url: str, call: tuple[str, dict[str, Any]], index: int, sync: Any) -> None:
    """Worker process entry point: open the ledger, report ready, send one command on the go."""
    command, kwargs = call
    go, reports = sync
    ledger = open_ledger_at(url)
    try:
        reports.put((index, ("ready", None)))
        if not go.wait(STARTUP_TIMEOUT):
            return
        try:
            result = getattr(ledger, command)(**kwargs)
        except ConcurrencyConflictError as error:
            reports.put((index, ("conflict", error.current_version)))
        except Exception as error:
            reports.put((index, ("error", f"{type(error).__name__}: {error}")))
        else:
            outcome = (result.order_id, result.version, result.position, result.replayed)
            reports.put((index, ("ok", outcome)))
    finally:
        ledger.close()


@contextmanager
def _write_lock_held(url: str) -> Iterator[None]:
    """Hold the store's write lock; readers go on, every writer queues behind it."""
    env = event_store_env(url)
    if url.startswith("sqlite"):
        conn = sqlite3.connect(env["SQLITE_DBNAME"], isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()
    else:
        with psycopg.connect(url) as conn:
            conn.execute("LOCK TABLE orderledger_events IN EXCLUSIVE MODE")
            yield
            conn.rollback()


def _wait_for_writers_to_queue(url: str, count: int) -> None:
    """Return once ``count`` writers wait for the write lock (PostgreSQL shows them)."""
    if url.startswith("sqlite"):
        # SQLite does not show who waits on its lock; give the workers a moment to get there.
        time.sleep(1.0)
        return
    deadline = time.monotonic() + WORKER_TIMEOUT
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks "
                "WHERE relation = 'orderledger_events'::regclass AND NOT granted"
            ).fetchone()
            if row is not None and row[0] >= count:
                return
            time.sleep(0.05)
    pytest.fail(f"{count} writers never queued for the events table")


def _collect(reports: Any, processes: list[Any], kind: str, deadline: float) -> dict[int, Outcome]:
    """One report per worker; fail at once if a worker dies without sending one."""
    received: dict[int, Outcome] = {}
    while len(received) < len(processes):
        try:
            index, outcome = reports.get(timeout=0.5)
        except queue.Empty:
            dead = [
                i
                for i, process in enumerate(processes)
                if i not in received and not process.is_alive() and reports.empty()
            ]
            if dead:
                pytest.fail(f"workers {dead} exited without a {kind} report: {received}")
            if time.monotonic() > deadline:
                pytest.fail(f"workers did not send a {kind} report in time: {received}")
            continue
        received[index] = outcome
    return received


def _run_together(url: str, calls: list[tuple[str, dict[str, Any]]]) -> list[Outcome]:
    """Run each (command, kwargs) in its own process, all at once; outcomes in call order."""
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    reports = ctx.Queue()
    processes = [
        ctx.Process(target=_run_command, args=(url, call, index, (go, reports)))
        for index, call in enumerate(calls)
    ]
    for process in processes:
        process.start()
    try:
        # Starting Python and opening the store is slow on a busy machine; the race is not.
        _collect(reports, processes, "ready", time.monotonic() + STARTUP_TIMEOUT)
        with _write_lock_held(url):
            go.set()
            _wait_for_writers_to_queue(url, len(calls))
        outcomes = _collect(reports, processes, "result", time.monotonic() + WORKER_TIMEOUT)
    finally:
        for process in processes:
            process.join(WORKER_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join()
    assert [process.exitcode for process in processes] == [0] * len(calls)
    return [outcomes[index] for index in range(len(calls))]


def _placed_event_count(ledger: OrderLedger) -> int:
    topic = get_topic(Order.Placed)
    notifications = ledger.recorder.select_notifications(start=1, limit=10_000, topics=[topic])
    return len(notifications)


def _place(ledger: OrderLedger, *, unit_price: int = 1000, quantity: int = 8) -> UUID:
    result = ledger.place_order(
        customer_id="cust-1",
        currency="EUR",
        lines=[{"sku": "SKU-1", "quantity": quantity, "unit_price": unit_price}],
    )
    return result.order_id


class TestConcurrentCommandsWithExpectedVersion:
    """Commands that carry the same expected version race for one slot."""

    def test_exactly_one_of_eight_processes_wins_and_the_rest_conflict(
        self, store_url: str
    ) -> None:
        """Eight captures expecting version 1 at once: one records, seven get a conflict."""
        ledger = open_ledger_at(store_url)
        order_id = _place(ledger)
        head_before = ledger.head_position()
        calls = [
            (
                "capture_payment",
                {
                    "order_id": order_id,
                    "amount": 100,
                    "payment_reference": f"pay-{index}",
                    "expected_version": 1,
                },
            )
            for index in range(WORKERS)
        ]

        outcomes = _run_together(store_url, calls)

        winners = [value for kind, value in outcomes if kind == "ok"]
        conflicts = [value for kind, value in outcomes if kind == "conflict"]
        assert len(winners) == 1, outcomes
        assert conflicts == [2] * (WORKERS - 1), outcomes
        _, version, position, replayed = winners[0]
        assert (version, replayed) == (2, False)
        assert ledger.head_position() == position == head_before + 1
        order = ledger.get_order(order_id)
        assert (order.version, order.captured) == (2, 100)
        assert len(ledger.order_history(order_id)) == 2


class TestConcurrentRepeatsOfOneIdempotencyKey:
    """The same keyed command sent by several processes at once is recorded once."""

    def test_eight_processes_placing_the_same_keyed_order_get_one_order(
        self, store_url: str
    ) -> None:
        """Every process gets the same order id, version and position; one order exists."""
        ledger = open_ledger_at(store_url)
        place = {
            "customer_id": "cust-7",
            "currency": "EUR",
            "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": 1250}],
            "idempotency_key": "checkout-7f3a",
        }

        outcomes = _run_together(store_url, [("place_order", place)] * WORKERS)

        assert all(kind == "ok" for kind, _ in outcomes), outcomes
        results = [value for _, value in outcomes]
        assert (
            len({(order_id, version, position) for order_id, version, position, _ in results}) == 1
        )
        assert sorted(replayed for *_, replayed in results) == [False] + [True] * (WORKERS - 1)
        order_id, version, position, _ = results[0]
        assert _placed_event_count(ledger) == 1
        assert [(e.position, e.version, e.type) for e in ledger.order_history(order_id)] == [
            (position, version, "OrderPlaced")
        ]
        # The order's event, nothing from the losers (whose rolled-back inserts may have taken
        # lower positions: PostgreSQL writers do not wait for each other). The key is not an
        # event: it is a row of the idempotency_keys table.
        stored = ledger.recorder.select_notifications(start=1, limit=100)
        assert len(stored) == 1
        assert ledger.head_position() == stored[-1].id
        again = ledger.place_order(**place)
        assert (again.order_id, again.version, again.position, again.replayed) == (
            order_id,
            version,
            position,
            True,
        )


class TestConcurrentCommandsWithoutExpectedVersion:
    """Commands without an expected version are retried on conflict until they fit."""

    def test_eight_processes_capturing_different_payments_all_succeed(self, store_url: str) -> None:
        """Every capture is recorded once, at its own version, and the amounts add up."""
        ledger = open_ledger_at(store_url)
        order_id = _place(ledger, unit_price=1000, quantity=10)
        amounts = [100 * (index + 1) for index in range(WORKERS)]
        calls = [
            (
                "capture_payment",
                {"order_id": order_id, "amount": amount, "payment_reference": f"pay-{index}"},
            )
            for index, amount in enumerate(amounts)
        ]

        outcomes = _run_together(store_url, calls)

        assert all(kind == "ok" for kind, _ in outcomes), outcomes
        versions = sorted(version for _, (_, version, _, _) in outcomes)
        assert versions == list(range(2, WORKERS + 2))
        order = ledger.get_order(order_id)
        assert order.captured == sum(amounts)
        assert sorted(order.payment_references) == sorted(f"pay-{i}" for i in range(WORKERS))
        history = ledger.order_history(order_id)
        returned = {(version, position) for _, (_, version, position, _) in outcomes}
        assert {(e.version, e.position) for e in history[1:]} == returned
        assert [e.type for e in history[1:]] == ["PaymentCaptured"] * WORKERS
