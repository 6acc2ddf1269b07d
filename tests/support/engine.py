"""Test-only projections, store fixtures and checks shared by the projection engine tests.

Everything here is real: the projections write real tables in the store's database and the
checks read the store through the ledger's own recorder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, ClassVar, cast
from uuid import UUID

from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    MetaData,
    String,
    Table,
    insert,
    inspect,
    select,
)

from api import bootstrap
from api.settings import Settings
from domain.ledger import EVENT_NAMES, OrderLedger
from domain.order import EVENT_TYPES, Order
from projections.base import Batch, Projection
from projections.engine.catalog import Generation
from projections.engine.runtime import ProjectionRuntime
from projections.engine.source import RecordedEvent
from projections.order_summaries import OrderSummaryProjection
from tests.support.stores import open_ledger_at
from tests.support.waiting import wait_for

ALL_ORDER_EVENTS: tuple[type[Aggregate.Event], ...] = tuple(EVENT_TYPES.values())
WAIT_TIMEOUT = 60.0

Trigger = Callable[[RecordedEvent], bool]


class PoisonError(RuntimeError):
    """What a poisoned handler raises."""


def never(_recorded: RecordedEvent) -> bool:
    return False


class AppliedPositionsProjection(Projection):
    """One row per applied position (primary key on position), written as each event is handled.

    The row is INSERTed inside ``handle`` itself, so when ``fail_on`` makes a handler raise,
    the rows of the earlier events and of the failing event are already written in the
    transaction: what survives shows exactly what the engine committed.
    """

    name = "applied_positions"
    version = 1
    handles: ClassVar[tuple[type[Aggregate.Event], ...]] = ALL_ORDER_EVENTS

    def __init__(self, fail_on: Trigger = never) -> None:
        self.fail_on = fail_on

    def define_tables(self, metadata: MetaData, suffix: str) -> dict[str, Table]:
        table = Table(
            f"applied_positions{suffix}",
            metadata,
            Column("position", BigInteger, primary_key=True, autoincrement=False),
            Column("event_type", String(32), nullable=False),
            Column("order_id", String(36), nullable=False),
        )
        return {"applied_positions": table}

    def batch(self, conn: Connection, tables: dict[str, Table]) -> Batch:
        return AppliedPositionsBatch(conn, tables, self.fail_on)


class AppliedPositionsBatch(Batch):
    """Inserts a row per event at once (not in ``flush``), then maybe raises."""

    def __init__(self, conn: Connection, tables: dict[str, Table], fail_on: Trigger) -> None:
        super().__init__(conn, tables)
        self.table = tables["applied_positions"]
        self.fail_on = fail_on

    def handle(self, recorded: RecordedEvent) -> None:
        self.conn.execute(
            insert(self.table).values(
                position=recorded.position,
                event_type=recorded.type_name,
                order_id=str(recorded.event.originator_id),
            )
        )
        if self.fail_on(recorded):
            raise PoisonError(f"cannot apply position {recorded.position}")

    def flush(self) -> None:
        """Every row was written by ``handle``."""


class PaymentsOnlyProjection(Projection):
    """Handles only PaymentCaptured: every other event is one it must skip over."""

    name = "payments_only"
    version = 1
    handles: ClassVar[tuple[type[Aggregate.Event], ...]] = (Order.PaymentCaptured,)

    def define_tables(self, metadata: MetaData, suffix: str) -> dict[str, Table]:
        table = Table(
            f"payments_only{suffix}",
            metadata,
            Column("position", BigInteger, primary_key=True, autoincrement=False),
            Column("order_id", String(36), nullable=False),
            Column("amount", BigInteger, nullable=False),
        )
        return {"payments_only": table}

    def batch(self, conn: Connection, tables: dict[str, Table]) -> Batch:
        return PaymentsBatch(conn, tables)


class PaymentsBatch(Batch):
    def __init__(self, conn: Connection, tables: dict[str, Table]) -> None:
        super().__init__(conn, tables)
        self.rows: list[dict[str, Any]] = []

    def handle(self, recorded: RecordedEvent) -> None:
        event = cast(Order.PaymentCaptured, recorded.event)
        if not isinstance(event, Order.PaymentCaptured):
            raise TypeError(f"payments_only does not handle {recorded.type_name}")
        self.rows.append(
            {
                "position": recorded.position,
                "order_id": str(event.originator_id),
                "amount": event.amount,
            }
        )

    def flush(self) -> None:
        if self.rows:
            self.conn.execute(insert(self.tables["payments_only"]), self.rows)


class PoisonedOrderSummaryProjection(OrderSummaryProjection):
    """order_summaries (same name and version) whose handler fails on chosen events."""

    def __init__(self, fail_on: Trigger) -> None:
        self.fail_on = fail_on

    def batch(self, conn: Connection, tables: dict[str, Table]) -> Batch:
        batch = super().batch(conn, tables)
        handle = batch.handle
        fail_on = self.fail_on

        def poisoned(recorded: RecordedEvent) -> None:
            handle(recorded)
            if fail_on(recorded):
                raise PoisonError(f"bad data in event at position {recorded.position}")

        batch.handle = poisoned  # type: ignore[method-assign]
        return batch


class OrderSummaryProjectionV2(OrderSummaryProjection):
    """The same read model shipped by a newer code version: it must be rebuilt."""

    version = 2


def at_position(position: int) -> Trigger:
    return lambda recorded: recorded.position == position


# -- the store ----------------------------------------------------------------------------------


@contextmanager
def opened(
    url: str,
    projections: Sequence[Projection],
    *,
    batch_size: int = 1000,
    lease_ttl: float = 10.0,
) -> Iterator[tuple[OrderLedger, ProjectionRuntime]]:
    """A ledger and a projection runtime on one store, closed afterwards."""
    settings = Settings(
        database_url=url,
        projection_batch_size=batch_size,
        projection_lease_ttl=lease_ttl,
        projection_poll_interval=0.01,
    )
    with bootstrap.opened(settings, projections=projections) as system:
        yield system.ledger, system.runtime


def place_and_pay(
    ledger: OrderLedger, count: int, *, prefix: str = "c", pay: bool = True
) -> list[UUID]:
    """Place ``count`` orders of varying totals and capture part of each one's total."""
    ids = []
    for index in range(count):
        quantity = 1 + index % 4
        result = ledger.place_order(
            customer_id=f"{prefix}-{index % 7}",
            currency="EUR",
            lines=[{"sku": f"SKU-{index % 5}", "quantity": quantity, "unit_price": 250}],
        )
        if pay:
            ledger.capture_payment(
                result.order_id, amount=100 + index % 50, payment_reference=f"{prefix}-{index}"
            )
        ids.append(result.order_id)
    readable(ledger)
    return ids


def readable(ledger: OrderLedger) -> None:
    """Wait until readers may pass every committed event. On PostgreSQL a transaction still
    running anywhere in the cluster holds them back: another test's, in a parallel run."""
    store = ledger.store
    wait_for(
        lambda: store.safe_head() >= store.last_committed(),
        "every committed event is readable",
        timeout=WAIT_TIMEOUT,
    )


def store_events(ledger: OrderLedger, page: int = 500) -> list[RecordedEvent]:
    """Every committed event in the store, oldest first, read in pages."""
    topics = [get_topic(cls) for cls in ALL_ORDER_EVENTS]
    found: list[RecordedEvent] = []
    after = 0
    while True:
        notifications = ledger.recorder.select_notifications(
            start=after, limit=page, topics=topics, inclusive_of_start=False
        )
        found.extend(
            RecordedEvent(n.id, cast(Aggregate.Event, ledger.mapper.to_domain_event(n)))
            for n in notifications
        )
        if len(notifications) < page:
            return found
        after = notifications[-1].id


def applied_positions(runtime: ProjectionRuntime, generation: int | None = None) -> list[int]:
    """Positions in the counting projection's serving (or given) generation, sorted."""
    name = AppliedPositionsProjection.name
    if generation is None:
        with runtime.reading(name) as (conn, tables):
            table = tables["applied_positions"]
            return list(conn.execute(select(table.c.position).order_by(table.c.position)).scalars())
    table = runtime.catalog.tables(name, generation)["applied_positions"]
    with runtime.engine.connect() as conn:
        return list(conn.execute(select(table.c.position).order_by(table.c.position)).scalars())


def rows_of(conn: Connection, table: Table) -> list[tuple[Any, ...]]:
    """Every row, sorted by primary key, with values made comparable across reads."""
    key = list(table.primary_key.columns)
    rows = conn.execute(select(table).order_by(*key)).all()
    return [tuple(_plain(value) for value in row) for row in rows]


def checksum(rows: Sequence[tuple[Any, ...]]) -> str:
    return hashlib.sha256(json.dumps(rows, default=str).encode()).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=None).isoformat() if value.tzinfo is None else value.isoformat()
    return value


def serving_rows(
    runtime: ProjectionRuntime, name: str, base: str
) -> tuple[str, list[tuple[Any, ...]]]:
    """The serving table's name and rows, read the way API readers read them."""
    with runtime.reading(name) as (conn, tables):
        table = tables[base]
        return table.name, rows_of(conn, table)


def generation_rows(
    runtime: ProjectionRuntime, name: str, generation: int, base: str
) -> list[tuple[Any, ...]]:
    table = runtime.catalog.tables(name, generation)[base]
    with runtime.engine.connect() as conn:
        return rows_of(conn, table)


def table_names(runtime: ProjectionRuntime) -> set[str]:
    return set(inspect(runtime.engine).get_table_names())


def only_generation(runtime: ProjectionRuntime, name: str, role: str) -> Generation:
    rows = [row for row in runtime.catalog.rows(name) if row.role == role]
    assert len(rows) == 1, runtime.catalog.rows(name)
    return rows[0]


def event_name(cls: type[Aggregate.Event]) -> str:
    return EVENT_NAMES[cls]


# -- entry points of worker processes (spawned, so they live in an importable module) ----------


class _ErrorCounter:
    """Counts error records the engine logs in a child process."""

    def __init__(self) -> None:
        self.count = 0
        self.messages: list[str] = []
        counter = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                counter.count += 1
                counter.messages.append(f"{record.getMessage()} {record.exc_text or ''}")

        handler = Handler(level=logging.ERROR)
        handler.setFormatter(logging.Formatter())
        logging.getLogger("orderledger.projections").addHandler(handler)


def race_worker_process(
    url: str, owner: str, lease_ttl: float, target: int, ready: Any, results: Any
) -> None:
    """Run a Worker on the counting projection until it reaches ``target``; report errors."""
    errors = _ErrorCounter()
    with opened(url, [AppliedPositionsProjection()], batch_size=5, lease_ttl=lease_ttl) as (
        _ledger,
        runtime,
    ):
        worker = runtime.worker(owner=owner)
        ready.wait(WAIT_TIMEOUT)
        worker.start()
        try:
            wait_for(
                lambda: _serving_position(runtime, AppliedPositionsProjection.name) >= target,
                "the counting projection reached the target",
                timeout=WAIT_TIMEOUT,
            )
        finally:
            worker.stop()
    results.put((owner, errors.count, errors.messages[:3]))


def _serving_position(runtime: ProjectionRuntime, name: str) -> int:
    row = runtime.catalog.serving(name)
    return row.position if row is not None else 0


def crash_mid_batch_process(url: str, crash_at: int, batch_size: int, reached: Any) -> None:
    """Apply batches until the handler of ``crash_at`` has written its row, then hang there."""

    def hang(recorded: RecordedEvent) -> bool:
        if recorded.position == crash_at:
            reached.set()
            time.sleep(3600)
        return False

    with opened(
        url, [AppliedPositionsProjection(fail_on=hang)], batch_size=batch_size, lease_ttl=0.5
    ) as (
        _ledger,
        runtime,
    ):
        runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)


def write_orders(
    url: str, prefix: str, count: int, ready: Any, hot_order: UUID, hot_every: int
) -> None:
    """A writer: place and pay ``count`` orders once every writer is ready, and now and then
    capture 1 on the order every writer shares (lost races there are retried by the ledger)."""
    ledger = open_ledger_at(url)
    try:
        ready.wait(WAIT_TIMEOUT)
        for index in range(count):
            place_and_pay(ledger, 1, prefix=f"{prefix}-{index}")
            if index % hot_every == 0:
                ledger.capture_payment(hot_order, amount=1, payment_reference=f"{prefix}-{index}")
    finally:
        ledger.close()


def starting_process(url: str, ready: Any, results: Any) -> None:
    """Open everything a starting API process opens (ledger, read models, key store) on
    ``url`` once every other such process is ready too; report what went wrong, if anything."""
    ready.wait(WAIT_TIMEOUT)
    try:
        settings = Settings(database_url=url)
        with bootstrap.opened(settings):
            bootstrap.open_key_store(settings).close()
    except Exception as error:
        results.put(repr(error))
    else:
        results.put(None)
