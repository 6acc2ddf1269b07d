"""Each order's currency and current lines, kept by a sales projection for its own use.

Later events carry only the order id (a removed line only its SKU, a cancellation nothing):
daily_sales and sku_sales each keep every order's currency and lines in a table of their own,
so each rebuilds without any other read model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Column, Connection, MetaData, String, Table, Text

from domain.order import Order
from projections.engine.rows import KeyedRows
from projections.engine.source import RecordedEvent

Lines = dict[str, list[int]]
"""An order's lines: SKU -> [quantity, unit price]."""


def order_lines_table(name: str, metadata: MetaData) -> Table:
    """The table of orders' currency and lines (as JSON), named ``name``."""
    return Table(
        name,
        metadata,
        Column("order_id", String(36), primary_key=True),
        Column("currency", String(3), nullable=False),
        Column("lines", Text, nullable=False),
    )


class OrderLines:
    """The orders one batch touches, loaded once; the changed ones written back at ``flush``."""

    def __init__(self, table: Table, projection: str) -> None:
        self.rows = KeyedRows(table, ("order_id",))
        self.lines: dict[str, Lines] = {}
        self.projection = projection

    def load(self, conn: Connection, events: Sequence[RecordedEvent]) -> None:
        """Read the orders of these events that were placed before."""
        self.rows.load(conn, "order_id", {str(r.event.originator_id) for r in events})
        for (order_id,), row in self.rows.rows.items():
            self.lines[order_id] = json.loads(row["lines"])

    def place(self, order_id: str, event: Order.Placed) -> Lines:
        """Keep a newly placed order; returns its lines."""
        lines = {line["sku"]: [line["quantity"], line["unit_price"]] for line in event.lines}
        self.lines[order_id] = lines
        self.rows.add({"order_id": order_id, "currency": event.currency, "lines": ""})
        return lines

    def add_line(self, order_id: str, event: Order.LineAdded) -> None:
        self._changing(order_id)[event.sku] = [event.quantity, event.unit_price]

    def remove_line(self, order_id: str, event: Order.LineRemoved) -> tuple[int, int]:
        """Forget the removed line; returns its quantity and unit price."""
        quantity, price = self._changing(order_id).pop(event.sku)
        return quantity, price

    def currency_of(self, order_id: str) -> str:
        currency: str = self._row(order_id)["currency"]
        return currency

    def lines_of(self, order_id: str) -> Lines:
        self._row(order_id)
        return self.lines[order_id]

    def flush(self, conn: Connection) -> None:
        for key in self.rows.dirty:
            self.rows.rows[key]["lines"] = json.dumps(
                self.lines[key[0]], separators=(",", ":"), sort_keys=True
            )
        self.rows.flush(conn)

    def _row(self, order_id: str) -> dict[str, Any]:
        row = self.rows.get((order_id,))
        if row is None:
            raise LookupError(f"{self.projection} has no placed order {order_id}")
        return row

    def _changing(self, order_id: str) -> Lines:
        lines = self.lines_of(order_id)
        self.rows.changed((order_id,))
        return lines
