"""The store in tests that run processes: orders to fill it, figures to check it against.

Test data is real but fast: orders are built in memory with the aggregate's own commands and
saved several hundred at a time through the ledger (the library's encoding and recorder, one
transaction per save). Figures to check read models against are read back from the store.
"""

from __future__ import annotations

import random
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

_SKUS = {
    "TEA-SENCHA-100G": 1250,
    "MUG-STONEWARE": 2490,
    "KETTLE-CAST-IRON": 8900,
    "WHISK-BAMBOO": 1599,
    "FILTER-PAPER-100": 399,
    "TRAY-WALNUT": 4500,
}
_CUSTOMERS = ("cust-alice", "cust-bruno", "cust-chiyo", "cust-dmitri", "cust-eleanor")
_CURRENCIES = ("EUR", "USD", "GBP")


def open_ledger_at(database_url: str) -> OrderLedger:
    """The ledger on a store, opened as every process opens it (with the test master key)."""
    return open_ledger(Settings(database_url=database_url))


# -- test data ------------------------------------------------------------------------------


def _one_order(rng: random.Random, serial: int) -> Order:
    """An order taken through one of several stories, entirely in memory."""
    skus = rng.sample(sorted(_SKUS), rng.randint(1, 3))
    order = Order.place(
        customer_id=rng.choice(_CUSTOMERS),
        currency=rng.choice(_CURRENCIES),
        lines=[{"sku": s, "quantity": rng.randint(1, 4), "unit_price": _SKUS[s]} for s in skus],
    )
    story = rng.randrange(6)
    if story == 0:
        return order
    if story == 1:
        spare = next(s for s in sorted(_SKUS) if s not in order.lines)
        order.add_line(sku=spare, quantity=1, unit_price=_SKUS[spare])
        order.cancel(reason="changed my mind")
        return order
    part = max(1, order.total // 3)
    order.capture_payment(amount=part, payment_reference=f"p{serial}-1")
    if story == 2:
        return order
    if story == 3:
        order.cancel(reason="out of stock")
        order.issue_refund(amount=part, reason="cancelled")
        return order
    order.capture_payment(amount=order.total - part, payment_reference=f"p{serial}-2")
    order.ship(carrier="DHL", tracking_number=f"T{serial}")
    if story == 5:
        order.deliver()
        order.issue_refund(amount=max(1, part // 2), reason="goodwill")
    return order


def generate_orders(
    ledger: OrderLedger, *, events: int, seed: int, per_save: int = 500, serial: int = 0
) -> int:
    """Record orders until at least ``events`` new events are in the store; return the head.

    ``serial`` keeps payment references unique when a test generates several times.
    """
    rng = random.Random(seed)
    recorded = 0
    while recorded < events:
        orders = []
        for _ in range(per_save):
            orders.append(_one_order(rng, serial))
            serial += 1
        recorded += sum(len(order.pending_events) for order in orders)
        ledger.save(*orders)
    return ledger.head_position()


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
