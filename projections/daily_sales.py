"""daily_sales: per UTC day and currency, orders placed, gross, money in and out, cancellations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import singledispatchmethod
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Date,
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
from projections.order_lines import OrderLines, order_lines_table


class DailySalesProjection(Projection):
    """Per day (the UTC date of each event) and currency: what was ordered, paid and refunded.

    ``gross`` is the total of orders placed that day, adjusted on the day a line is added or
    removed; ``net`` is captured minus refunded.
    """

    name = "daily_sales"
    version = 1
    handles = (
        Order.Placed,
        Order.LineAdded,
        Order.LineRemoved,
        Order.PaymentCaptured,
        Order.Cancelled,
        Order.RefundIssued,
    )

    def define_tables(self, metadata: MetaData, suffix: str) -> dict[str, Table]:
        sales = Table(
            f"daily_sales{suffix}",
            metadata,
            Column("day", Date, primary_key=True),
            Column("currency", String(3), primary_key=True),
            Column("orders_placed", Integer, nullable=False),
            Column("gross", BigInteger, nullable=False),
            Column("captured", BigInteger, nullable=False),
            Column("refunded", BigInteger, nullable=False),
            Column("net", BigInteger, nullable=False),
            Column("cancellations", Integer, nullable=False),
        )
        # Later events carry only the order id (and a removed line only its SKU): this
        # projection keeps each order's currency and lines itself, to rebuild on its own.
        orders = order_lines_table(f"daily_sales_orders{suffix}", metadata)
        return {"daily_sales": sales, "daily_sales_orders": orders}

    def batch(self, conn: Connection, tables: dict[str, Table]) -> Batch:
        return DailySalesBatch(conn, tables)


class DailySalesBatch(Batch):
    """Folds a batch of order events into day rows held in memory."""

    def __init__(self, conn: Connection, tables: dict[str, Table]) -> None:
        super().__init__(conn, tables)
        self.orders = OrderLines(tables["daily_sales_orders"], DailySalesProjection.name)
        self.sales = KeyedRows(tables["daily_sales"], ("day", "currency"))

    def load(self, events: Sequence[RecordedEvent]) -> None:
        self.orders.load(self.conn, events)
        # Every row of those days: a (day, currency) not among them is new.
        self.sales.load(self.conn, "day", {_day(r.event.timestamp) for r in events})

    def handle(self, recorded: RecordedEvent) -> None:
        self.on_event(recorded.event, str(recorded.event.originator_id))

    @singledispatchmethod
    def on_event(self, event: object, order_id: str) -> None:
        raise TypeError(f"daily_sales does not handle {type(event).__qualname__}")

    @on_event.register
    def order_placed(self, event: Order.Placed, order_id: str) -> None:
        lines = self.orders.place(order_id, event)
        day = self._day_row(event.timestamp, event.currency)
        day["orders_placed"] += 1
        day["gross"] = add_amounts(day["gross"], sum(q * p for q, p in lines.values()))

    @on_event.register
    def line_added(self, event: Order.LineAdded, order_id: str) -> None:
        self.orders.add_line(order_id, event)
        day = self._day_row(event.timestamp, self.orders.currency_of(order_id))
        day["gross"] = add_amounts(day["gross"], event.quantity * event.unit_price)

    @on_event.register
    def line_removed(self, event: Order.LineRemoved, order_id: str) -> None:
        quantity, price = self.orders.remove_line(order_id, event)
        day = self._day_row(event.timestamp, self.orders.currency_of(order_id))
        day["gross"] = add_amounts(day["gross"], -quantity * price)

    @on_event.register
    def payment_captured(self, event: Order.PaymentCaptured, order_id: str) -> None:
        day = self._day_row(event.timestamp, self.orders.currency_of(order_id))
        day["captured"] = add_amounts(day["captured"], event.amount)
        day["net"] = add_amounts(day["captured"], -day["refunded"])

    @on_event.register
    def order_cancelled(self, event: Order.Cancelled, order_id: str) -> None:
        self._day_row(event.timestamp, self.orders.currency_of(order_id))["cancellations"] += 1

    @on_event.register
    def refund_issued(self, event: Order.RefundIssued, order_id: str) -> None:
        day = self._day_row(event.timestamp, self.orders.currency_of(order_id))
        day["refunded"] = add_amounts(day["refunded"], event.amount)
        day["net"] = add_amounts(day["captured"], -day["refunded"])

    def _day_row(self, timestamp: datetime, currency: str) -> dict[str, Any]:
        key = (_day(timestamp), currency)
        row = self.sales.get(key)
        if row is None:
            row = {
                "day": key[0],
                "currency": currency,
                "orders_placed": 0,
                "gross": 0,
                "captured": 0,
                "refunded": 0,
                "net": 0,
                "cancellations": 0,
            }
            self.sales.add(row)
        self.sales.changed(key)
        return row

    def flush(self) -> None:
        self.orders.flush(self.conn)
        self.sales.flush(self.conn)


def _day(timestamp: datetime) -> date:
    """The UTC calendar day of a moment."""
    return timestamp.astimezone(UTC).date()


# -- queries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DailySales:
    """One day's sales in one currency, in minor units."""

    day: date
    currency: str
    orders_placed: int
    gross: int
    captured: int
    refunded: int
    net: int
    cancellations: int


def daily_sales_between(
    conn: Connection,
    tables: dict[str, Table],
    start: date,
    end: date,
    *,
    currency: str | None = None,
) -> list[DailySales]:
    """Sales per day and currency from ``start`` to ``end`` inclusive, by day then currency."""
    if end < start:
        raise ValueError(f"the end date {end} is before the start date {start}")
    table = tables["daily_sales"]
    conditions = [table.c.day >= start, table.c.day <= end]
    if currency is not None:
        conditions.append(table.c.currency == currency)
    query = select(table).where(*conditions).order_by(table.c.day, table.c.currency)
    return [DailySales(**row._mapping) for row in conn.execute(query)]
