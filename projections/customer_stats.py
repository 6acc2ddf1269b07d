"""customer_stats: per customer, orders placed, first and last order, net spend per currency."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import singledispatchmethod
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    select,
)

from domain.order import Order
from projections.base import Batch, Projection
from projections.engine.rows import KeyedRows, add_amounts
from projections.engine.source import RecordedEvent


class CustomerStatsProjection(Projection):
    """Per customer: how many orders, when, and what they paid net of refunds per currency."""

    name = "customer_stats"
    version = 1
    handles = (Order.Placed, Order.PaymentCaptured, Order.RefundIssued)

    def define_tables(self, metadata: MetaData, suffix: str) -> dict[str, Table]:
        stats = Table(
            f"customer_stats{suffix}",
            metadata,
            Column("customer_id", String(64), primary_key=True),
            Column("orders", Integer, nullable=False),
            Column("first_order_at", DateTime(timezone=True), nullable=False),
            Column("last_order_at", DateTime(timezone=True), nullable=False),
        )
        spend = Table(
            f"customer_spend{suffix}",
            metadata,
            Column("customer_id", String(64), primary_key=True),
            Column("currency", String(3), primary_key=True),
            Column("captured", BigInteger, nullable=False),
            Column("refunded", BigInteger, nullable=False),
            Column("net", BigInteger, nullable=False),
        )
        # Payments and refunds carry only the order id; this projection keeps its own map so
        # it can be rebuilt without any other read model.
        orders = Table(
            f"customer_stats_orders{suffix}",
            metadata,
            Column("order_id", String(36), primary_key=True),
            Column("customer_id", String(64), nullable=False),
            Column("currency", String(3), nullable=False),
        )
        return {"customer_stats": stats, "customer_spend": spend, "customer_stats_orders": orders}

    def batch(self, conn: Connection, tables: dict[str, Table]) -> Batch:
        return CustomerStatsBatch(conn, tables)


class CustomerStatsBatch(Batch):
    """Folds a batch of order events into customer rows held in memory."""

    def __init__(self, conn: Connection, tables: dict[str, Table]) -> None:
        super().__init__(conn, tables)
        self.orders = KeyedRows(tables["customer_stats_orders"], ("order_id",))
        self.stats = KeyedRows(tables["customer_stats"], ("customer_id",))
        self.spend = KeyedRows(tables["customer_spend"], ("customer_id", "currency"))

    def load(self, events: Sequence[RecordedEvent]) -> None:
        order_ids = {str(r.event.originator_id) for r in events}
        self.orders.load(self.conn, "order_id", order_ids)
        customers = {row["customer_id"] for row in self.orders.rows.values()}
        customers.update(r.event.customer_id for r in events if isinstance(r.event, Order.Placed))
        self.stats.load(self.conn, "customer_id", customers)
        self.spend.load(self.conn, "customer_id", customers)
        for row in self.stats.rows.values():
            row["first_order_at"] = _utc(row["first_order_at"])
            row["last_order_at"] = _utc(row["last_order_at"])

    def handle(self, recorded: RecordedEvent) -> None:
        self.on_event(recorded.event, str(recorded.event.originator_id))

    @singledispatchmethod
    def on_event(self, event: object, order_id: str) -> None:
        raise TypeError(f"customer_stats does not handle {type(event).__qualname__}")

    @on_event.register
    def order_placed(self, event: Order.Placed, order_id: str) -> None:
        customer, currency, at = event.customer_id, event.currency, _utc(event.timestamp)
        self.orders.add({"order_id": order_id, "customer_id": customer, "currency": currency})
        stats = self.stats.get((customer,))
        if stats is None:
            self.stats.add(
                {"customer_id": customer, "orders": 1, "first_order_at": at, "last_order_at": at}
            )
        else:
            stats["orders"] += 1
            # Concurrent writers may commit a little out of time order: keep the extremes.
            stats["first_order_at"] = min(stats["first_order_at"], at)
            stats["last_order_at"] = max(stats["last_order_at"], at)
            self.stats.changed((customer,))
        if self.spend.get((customer, currency)) is None:
            self.spend.add(
                {
                    "customer_id": customer,
                    "currency": currency,
                    "captured": 0,
                    "refunded": 0,
                    "net": 0,
                }
            )

    @on_event.register
    def payment_captured(self, event: Order.PaymentCaptured, order_id: str) -> None:
        spend = self._spend_of(order_id)
        spend["captured"] = add_amounts(spend["captured"], event.amount)
        spend["net"] = add_amounts(spend["captured"], -spend["refunded"])

    @on_event.register
    def refund_issued(self, event: Order.RefundIssued, order_id: str) -> None:
        spend = self._spend_of(order_id)
        spend["refunded"] = add_amounts(spend["refunded"], event.amount)
        spend["net"] = add_amounts(spend["captured"], -spend["refunded"])

    def _spend_of(self, order_id: str) -> dict[str, Any]:
        order = self.orders.get((order_id,))
        if order is None:
            raise LookupError(f"customer_stats has no placed order {order_id}")
        key = (order["customer_id"], order["currency"])
        spend = self.spend.get(key)
        if spend is None:
            raise LookupError(f"customer_stats has no spend row for order {order_id}")
        self.spend.changed(key)
        return spend

    def flush(self) -> None:
        self.orders.flush(self.conn)
        self.stats.flush(self.conn)
        self.spend.flush(self.conn)


def _utc(value: datetime) -> datetime:
    """Stored as UTC; SQLite hands it back without a zone."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# -- queries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CustomerSpend:
    """What a customer paid in one currency, in minor units."""

    currency: str
    captured: int
    refunded: int
    net: int


@dataclass(frozen=True)
class CustomerStats:
    """A customer as the read model knows them."""

    customer_id: str
    orders: int
    first_order_at: datetime
    last_order_at: datetime
    spend: list[CustomerSpend]


def get_customer_stats(
    conn: Connection, tables: dict[str, Table], customer_id: str
) -> CustomerStats | None:
    """One customer's order count, order times and spend per currency, or None."""
    stats_table, spend_table = tables["customer_stats"], tables["customer_spend"]
    row = conn.execute(select(stats_table).where(stats_table.c.customer_id == customer_id)).first()
    if row is None:
        return None
    spend = conn.execute(
        select(spend_table)
        .where(spend_table.c.customer_id == customer_id)
        .order_by(spend_table.c.currency)
    )
    return CustomerStats(
        customer_id=row.customer_id,
        orders=row.orders,
        first_order_at=_utc(row.first_order_at),
        last_order_at=_utc(row.last_order_at),
        spend=[
            CustomerSpend(currency=s.currency, captured=s.captured, refunded=s.refunded, net=s.net)
            for s in spend
        ],
    )
