"""sku_sales: per SKU and currency, units ordered and cancelled, revenue net of cancellations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import singledispatchmethod
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
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


class SkuSalesProjection(Projection):
    """Per SKU and currency: units ordered, units cancelled and the revenue still standing.

    Adding or removing a line changes units ordered; cancelling an order moves its current
    lines to units cancelled and takes them out of revenue.
    """

    name = "sku_sales"
    version = 1
    handles = (Order.Placed, Order.LineAdded, Order.LineRemoved, Order.Cancelled)

    def define_tables(self, metadata: MetaData, suffix: str) -> dict[str, Table]:
        sales = Table(
            f"sku_sales{suffix}",
            metadata,
            Column("sku", String(64), primary_key=True),
            Column("currency", String(3), primary_key=True),
            Column("units_ordered", BigInteger, nullable=False),
            Column("units_cancelled", BigInteger, nullable=False),
            Column("net_units", BigInteger, nullable=False),
            Column("revenue", BigInteger, nullable=False),
            Index(f"sku_sales{suffix}_top", "net_units", "sku", "currency"),
            Index(f"sku_sales{suffix}_currency_top", "currency", "net_units", "sku"),
        )
        # A cancellation and a removed line carry no quantities: keep each order's lines here
        # so this projection rebuilds without any other read model.
        orders = order_lines_table(f"sku_sales_orders{suffix}", metadata)
        return {"sku_sales": sales, "sku_sales_orders": orders}

    def batch(self, conn: Connection, tables: dict[str, Table]) -> Batch:
        return SkuSalesBatch(conn, tables)


class SkuSalesBatch(Batch):
    """Folds a batch of order events into SKU rows held in memory."""

    def __init__(self, conn: Connection, tables: dict[str, Table]) -> None:
        super().__init__(conn, tables)
        self.orders = OrderLines(tables["sku_sales_orders"], SkuSalesProjection.name)
        self.sales = KeyedRows(tables["sku_sales"], ("sku", "currency"))

    def load(self, events: Sequence[RecordedEvent]) -> None:
        self.orders.load(self.conn, events)
        skus: set[str] = set()
        for lines in self.orders.lines.values():
            skus.update(lines)
        for recorded in events:
            event = recorded.event
            if isinstance(event, Order.Placed):
                skus.update(line["sku"] for line in event.lines)
            elif isinstance(event, Order.LineAdded):
                skus.add(event.sku)
        # Every currency of those SKUs: a (sku, currency) not among them is new.
        self.sales.load(self.conn, "sku", skus)

    def handle(self, recorded: RecordedEvent) -> None:
        self.on_event(recorded.event, str(recorded.event.originator_id))

    @singledispatchmethod
    def on_event(self, event: object, order_id: str) -> None:
        raise TypeError(f"sku_sales does not handle {type(event).__qualname__}")

    @on_event.register
    def order_placed(self, event: Order.Placed, order_id: str) -> None:
        self.orders.place(order_id, event)
        for line in event.lines:
            self._ordered(line["sku"], event.currency, line["quantity"], line["unit_price"])

    @on_event.register
    def line_added(self, event: Order.LineAdded, order_id: str) -> None:
        self.orders.add_line(order_id, event)
        currency = self.orders.currency_of(order_id)
        self._ordered(event.sku, currency, event.quantity, event.unit_price)

    @on_event.register
    def line_removed(self, event: Order.LineRemoved, order_id: str) -> None:
        quantity, price = self.orders.remove_line(order_id, event)
        row = self._sales_row(event.sku, self.orders.currency_of(order_id))
        row["units_ordered"] = add_amounts(row["units_ordered"], -quantity)
        row["revenue"] = add_amounts(row["revenue"], -quantity * price)
        self._net(row)

    @on_event.register
    def order_cancelled(self, event: Order.Cancelled, order_id: str) -> None:
        currency = self.orders.currency_of(order_id)
        for sku, (quantity, price) in self.orders.lines_of(order_id).items():
            row = self._sales_row(sku, currency)
            row["units_cancelled"] = add_amounts(row["units_cancelled"], quantity)
            row["revenue"] = add_amounts(row["revenue"], -quantity * price)
            self._net(row)

    def _ordered(self, sku: str, currency: str, quantity: int, price: int) -> None:
        row = self._sales_row(sku, currency)
        row["units_ordered"] = add_amounts(row["units_ordered"], quantity)
        row["revenue"] = add_amounts(row["revenue"], quantity * price)
        self._net(row)

    def _sales_row(self, sku: str, currency: str) -> dict[str, Any]:
        row = self.sales.get((sku, currency))
        if row is None:
            row = {
                "sku": sku,
                "currency": currency,
                "units_ordered": 0,
                "units_cancelled": 0,
                "net_units": 0,
                "revenue": 0,
            }
            self.sales.add(row)
        self.sales.changed((sku, currency))
        return row

    @staticmethod
    def _net(row: dict[str, Any]) -> None:
        row["net_units"] = add_amounts(row["units_ordered"], -row["units_cancelled"])

    def flush(self) -> None:
        self.orders.flush(self.conn)
        self.sales.flush(self.conn)


# -- queries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkuSales:
    """One SKU's sales in one currency; revenue in minor units."""

    sku: str
    currency: str
    units_ordered: int
    units_cancelled: int
    net_units: int
    revenue: int


def top_skus(
    conn: Connection,
    tables: dict[str, Table],
    *,
    limit: int = 10,
    currency: str | None = None,
) -> list[SkuSales]:
    """The SKUs with the most units ordered and not cancelled, most first (ties by SKU)."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    table = tables["sku_sales"]
    query = select(table)
    if currency is not None:
        query = query.where(table.c.currency == currency)
    query = query.order_by(table.c.net_units.desc(), table.c.sku, table.c.currency).limit(limit)
    return [SkuSales(**row._mapping) for row in conn.execute(query)]
