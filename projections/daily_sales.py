"""daily_sales: per UTC day and currency, orders placed, gross, money in and out, cancellations."""

from __future__ import annotations

import json
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
    Text,
    select,
)

from domain.order import Order
from projections.base import Batch, Projection
from projections.engine.rows import KeyedRows, add_amounts
from projections.engine.source import RecordedEvent


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
        orders = Table(
            f"daily_sales_orders{suffix}",
            metadata,
            Column("order_id", String(36), primary_key=True),
            Column("currency", String(3), nullable=False),
            Column("lines", Text, nullable=False),
        )
        return {"daily_sales": sales, "daily_sales_orders": orders}

    def batch(self, conn: Connection, tables: dict[str, Table]) -> Batch:
        return DailySalesBatch(conn, tables)


class DailySalesBatch(Batch):
    """Folds a batch of order events into day rows held in memory."""

    def __init__(self, conn: Connection, tables: dict[str, Table]) -> None:
        super().__init__(conn, tables)
        self.orders = KeyedRows(tables["daily_sales_orders"], ("order_id",))
        self.sales = KeyedRows(tables["daily_sales"], ("day", "currency"))
        self.lines: dict[str, dict[str, list[int]]] = {}

    def load(self, events: Sequence[RecordedEvent]) -> None:
        self.orders.load(self.conn, "order_id", {str(r.event.originator_id) for r in events})
        for order_id, row in self.orders.rows.items():
            self.lines[order_id[0]] = json.loads(row["lines"])
        # Every row of those days: a (day, currency) not among them is new.
        self.sales.load(self.conn, "day", {_day(r.event.timestamp) for r in events})

    def handle(self, recorded: RecordedEvent) -> None:
        self.on_event(recorded.event, str(recorded.event.originator_id))

    @singledispatchmethod
    def on_event(self, event: object, order_id: str) -> None:
        raise TypeError(f"daily_sales does not handle {type(event).__qualname__}")

    @on_event.register
    def order_placed(self, event: Order.Placed, order_id: str) -> None:
        lines = {line["sku"]: [line["quantity"], line["unit_price"]] for line in event.lines}
        self.lines[order_id] = lines
        self.orders.add({"order_id": order_id, "currency": event.currency, "lines": ""})
        day = self._day_row(event.timestamp, event.currency)
        day["orders_placed"] += 1
        day["gross"] = add_amounts(day["gross"], sum(q * p for q, p in lines.values()))

    @on_event.register
    def line_added(self, event: Order.LineAdded, order_id: str) -> None:
        self._lines_of(order_id)[event.sku] = [event.quantity, event.unit_price]
        day = self._day_row(event.timestamp, self._currency_of(order_id))
        day["gross"] = add_amounts(day["gross"], event.quantity * event.unit_price)

    @on_event.register
    def line_removed(self, event: Order.LineRemoved, order_id: str) -> None:
        quantity, price = self._lines_of(order_id).pop(event.sku)
        day = self._day_row(event.timestamp, self._currency_of(order_id))
        day["gross"] = add_amounts(day["gross"], -quantity * price)

    @on_event.register
    def payment_captured(self, event: Order.PaymentCaptured, order_id: str) -> None:
        day = self._day_row(event.timestamp, self._currency_of(order_id))
        day["captured"] = add_amounts(day["captured"], event.amount)
        day["net"] = add_amounts(day["captured"], -day["refunded"])

    @on_event.register
    def order_cancelled(self, event: Order.Cancelled, order_id: str) -> None:
        self._day_row(event.timestamp, self._currency_of(order_id))["cancellations"] += 1

    @on_event.register
    def refund_issued(self, event: Order.RefundIssued, order_id: str) -> None:
        day = self._day_row(event.timestamp, self._currency_of(order_id))
        day["refunded"] = add_amounts(day["refunded"], event.amount)
        day["net"] = add_amounts(day["captured"], -day["refunded"])

    def _order(self, order_id: str) -> dict[str, Any]:
        order = self.orders.get((order_id,))
        if order is None:
            raise LookupError(f"daily_sales has no placed order {order_id}")
        return order

    def _currency_of(self, order_id: str) -> str:
        currency: str = self._order(order_id)["currency"]
        return currency

    def _lines_of(self, order_id: str) -> dict[str, list[int]]:
        self._order(order_id)
        self.orders.changed((order_id,))
        return self.lines[order_id]

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
        for key in self.orders.dirty:
            self.orders.rows[key]["lines"] = json.dumps(
                self.lines[key[0]], separators=(",", ":"), sort_keys=True
            )
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
    return [
        DailySales(
            day=row.day,
            currency=row.currency,
            orders_placed=row.orders_placed,
            gross=row.gross,
            captured=row.captured,
            refunded=row.refunded,
            net=row.net,
            cancellations=row.cancellations,
        )
        for row in conn.execute(query)
    ]
