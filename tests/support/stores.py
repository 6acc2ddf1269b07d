"""The store in tests that run processes: figures to check it against, its tracking table.

Figures to check read models against are read back from the store (orders to fill it come
from tests/support/orders.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic
from sqlalchemy import func, select

from api.bootstrap import open_ledger, opened
from api.settings import Settings
from domain.ledger import OrderLedger
from domain.order import EVENT_TYPES, Order
from projections.engine.catalog import BUILDING, SERVING, Generation
from projections.engine.runtime import ProjectionRuntime
from tests.support.projections import checksum, table_contents


def open_ledger_at(database_url: str) -> OrderLedger:
    """The ledger on a store, opened as every process opens it (with the test master key)."""
    return open_ledger(Settings(database_url=database_url))


@dataclass(frozen=True)
class Figures:
    """Order counts and money totals, either from the store or from order_summaries."""

    orders: int
    captured: int
    refunded: int
    cancelled: int
    shipped: int


def store_figures(ledger: OrderLedger, page: int = 2000) -> Figures:
    """The figures taken directly from every committed event in the store."""
    topics = [get_topic(cls) for cls in EVENT_TYPES.values()]
    orders = captured = refunded = cancelled = shipped = 0
    after = 0
    while True:
        notifications = ledger.recorder.select_notifications(
            start=after, limit=page, topics=topics, inclusive_of_start=False
        )
        for notification in notifications:
            event = cast(Aggregate.Event, ledger.mapper.to_domain_event(notification))
            if isinstance(event, Order.Placed):
                orders += 1
            elif isinstance(event, Order.PaymentCaptured):
                captured += event.amount
            elif isinstance(event, Order.RefundIssued):
                refunded += event.amount
            elif isinstance(event, Order.Cancelled):
                cancelled += 1
            elif isinstance(event, Order.Shipped):
                shipped += 1
        if len(notifications) < page:
            return Figures(orders, captured, refunded, cancelled, shipped)
        after = notifications[-1].id


def summary_figures(runtime: ProjectionRuntime) -> Figures:
    """The same figures as order_summaries' serving generation holds them."""
    with runtime.reading("order_summaries") as (conn, tables):
        table = tables["order_summaries"]
        row = conn.execute(
            select(
                func.count(),
                func.coalesce(func.sum(table.c.captured), 0),
                func.coalesce(func.sum(table.c.refunded), 0),
                func.count().filter(table.c.cancelled.is_(True)),
                func.count().filter(table.c.shipped.is_(True)),
            ).select_from(table)
        ).one()
    return Figures(*(int(value) for value in row))


def checksums(runtime: ProjectionRuntime) -> dict[str, str]:
    """A digest of every serving table of every registered projection, by projection."""
    return {p.name: checksum(table_contents(runtime, p.name)) for p in runtime.projections}


# -- the tracking table -----------------------------------------------------------------------


def generations_by_role(runtime: ProjectionRuntime, role: str) -> dict[str, Generation]:
    """The generation of each projection in the given role (projections without one left out)."""
    return {row.name: row for row in runtime.catalog.rows() if row.role == role}


def owner_pid(row: Generation) -> int | None:
    """The process id inside a lease owner (``host:pid:suffix``), or None when unowned."""
    if row.lease_owner is None:
        return None
    return int(row.lease_owner.split(":")[-2])


def all_serving_at(runtime: ProjectionRuntime, names: Sequence[str], head: int) -> bool:
    """Every named projection serves at ``head``, nothing building, nothing stopped."""
    serving = generations_by_role(runtime, SERVING)
    if generations_by_role(runtime, BUILDING):
        return False
    return all(
        name in serving and serving[name].position >= head and not serving[name].failed
        for name in names
    )


@contextmanager
def opened_store(url: str) -> Iterator[tuple[OrderLedger, ProjectionRuntime]]:
    """This process's own ledger and projection runtime on the store, closed afterwards."""
    with opened(Settings(database_url=url)) as system:
        yield system.ledger, system.runtime
