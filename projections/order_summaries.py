"""order_summaries: one row per order with its status and money figures; its queries."""

from __future__ import annotations

import base64
import inspect
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import singledispatchmethod
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    or_,
    select,
)

from domain.order import EVENT_TYPES, Order
from domain.summary import balance_due, order_status, refund_due
from projections.base import Batch, Projection
from projections.engine.database import insert_rows, update_rows
from projections.engine.rows import rows_with
from projections.engine.source import RecordedEvent

_CHUNK = 500


class OrderSummaryProjection(Projection):
    """Per order: status, customer, currency, lines, total, captured, refunded and dues."""

    name = "order_summaries"
    version = 1
    handles = tuple(EVENT_TYPES.values())

    def define_tables(self, metadata: MetaData, suffix: str) -> dict[str, Table]:
        table = Table(
            f"order_summaries{suffix}",
            metadata,
            Column("order_id", String(36), primary_key=True),
            Column("status", String(20), nullable=False),
            Column("customer_id", String(64), nullable=False),
            Column("currency", String(3), nullable=False),
            Column("line_count", Integer, nullable=False),
            Column("lines", Text, nullable=False),
            Column("total", BigInteger, nullable=False),
            Column("captured", BigInteger, nullable=False),
            Column("refunded", BigInteger, nullable=False),
            Column("refund_due", BigInteger, nullable=False),
            Column("balance_due", BigInteger, nullable=False),
            Column("shipped", Boolean, nullable=False),
            Column("delivered", Boolean, nullable=False),
            Column("cancelled", Boolean, nullable=False),
            Column("placed_at", DateTime(timezone=True), nullable=False),
            Column("updated_at", DateTime(timezone=True), nullable=False),
            Column("version", Integer, nullable=False),
            Column("last_position", BigInteger, nullable=False),
            Index(f"order_summaries{suffix}_placed", "placed_at", "order_id"),
            Index(f"order_summaries{suffix}_customer", "customer_id", "placed_at", "order_id"),
            Index(f"order_summaries{suffix}_status", "status", "placed_at", "order_id"),
        )
        return {"order_summaries": table}

    def batch(self, conn: Connection, tables: dict[str, Table]) -> Batch:
        return OrderSummaryBatch(conn, tables)


class OrderSummaryBatch(Batch):
    """Folds a batch of order events into summary rows held in memory.

    Handlers change the figures an event carries; the figures derived from them (lines as
    JSON, line count, total, status, dues) are computed once per changed row at ``flush``.
    """

    def __init__(self, conn: Connection, tables: dict[str, Table]) -> None:
        super().__init__(conn, tables)
        self.table = tables["order_summaries"]
        self.rows: dict[str, dict[str, Any]] = {}
        self.lines: dict[str, dict[str, list[int]]] = {}
        self.existing: set[str] = set()
        self.changed: set[str] = set()
        self._handlers: dict[type, Callable[..., None]] = {}
        # Each originator id's string, made once per batch (an order has several events).
        self._order_ids: dict[Any, str] = {}

    def _order_id(self, originator_id: Any) -> str:
        order_id = self._order_ids.get(originator_id)
        if order_id is None:
            order_id = self._order_ids[originator_id] = str(originator_id)
        return order_id

    def load(self, events: Sequence[RecordedEvent]) -> None:
        ids = list({self._order_id(r.event.originator_id): None for r in events})
        query = rows_with(self.table, "order_id")
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            for row in self.conn.execute(query, {"values": chunk}):
                values = dict(row._mapping)
                self.rows[values["order_id"]] = values
                self.lines[values["order_id"]] = json.loads(values["lines"])
                self.existing.add(values["order_id"])

    def handle(self, recorded: RecordedEvent) -> None:
        event = recorded.event
        order_id = self._order_id(event.originator_id)
        # The handler registered for the event's class, looked up once per class: going
        # through the singledispatchmethod descriptor costs more than most handlers.
        event_type = type(event)
        handler = self._handlers.get(event_type)
        if handler is None:
            dispatcher = inspect.getattr_static(type(self), "on_event").dispatcher
            handler = dispatcher.dispatch(event_type)
            self._handlers[event_type] = handler
        handler(self, event, order_id)
        row = self.rows[order_id]
        row["version"] = event.originator_version
        row["last_position"] = recorded.position
        # SQLite keeps no time zone: store UTC so reading it back as UTC is right.
        row["updated_at"] = event.timestamp.astimezone(UTC)
        self.changed.add(order_id)

    @singledispatchmethod
    def on_event(self, event: object, order_id: str) -> None:
        raise TypeError(f"order_summaries does not handle {type(event).__qualname__}")

    @on_event.register
    def order_placed(self, event: Order.Placed, order_id: str) -> None:
        self.lines[order_id] = {
            line["sku"]: [line["quantity"], line["unit_price"]] for line in event.lines
        }
        self.rows[order_id] = {
            "order_id": order_id,
            "customer_id": event.customer_id,
            "currency": event.currency,
            "captured": 0,
            "refunded": 0,
            "shipped": False,
            "delivered": False,
            "cancelled": False,
            "placed_at": event.timestamp.astimezone(UTC),
        }

    @on_event.register
    def line_added(self, event: Order.LineAdded, order_id: str) -> None:
        self.lines[order_id][event.sku] = [event.quantity, event.unit_price]

    @on_event.register
    def line_removed(self, event: Order.LineRemoved, order_id: str) -> None:
        del self.lines[order_id][event.sku]

    @on_event.register
    def payment_captured(self, event: Order.PaymentCaptured, order_id: str) -> None:
        self.rows[order_id]["captured"] += event.amount

    @on_event.register
    def order_shipped(self, event: Order.Shipped, order_id: str) -> None:
        self.rows[order_id]["shipped"] = True

    @on_event.register
    def order_delivered(self, event: Order.Delivered, order_id: str) -> None:
        self.rows[order_id]["delivered"] = True

    @on_event.register
    def order_cancelled(self, event: Order.Cancelled, order_id: str) -> None:
        self.rows[order_id]["cancelled"] = True

    @on_event.register
    def refund_issued(self, event: Order.RefundIssued, order_id: str) -> None:
        self.rows[order_id]["refunded"] += event.amount

    def _recompute(self, order_id: str) -> None:
        """Derive the figures of one row from its lines, payments and flags."""
        row = self.rows[order_id]
        lines = self.lines[order_id]
        row["lines"] = _lines_json(lines)
        row["line_count"] = len(lines)
        row["total"] = sum(quantity * price for quantity, price in lines.values())
        row["status"] = order_status(
            total=row["total"],
            captured=row["captured"],
            shipped=row["shipped"],
            delivered=row["delivered"],
            cancelled=row["cancelled"],
        )
        row["balance_due"] = balance_due(
            total=row["total"], captured=row["captured"], cancelled=row["cancelled"]
        )
        row["refund_due"] = refund_due(
            captured=row["captured"], refunded=row["refunded"], cancelled=row["cancelled"]
        )

    def flush(self) -> None:
        for order_id in self.changed:
            self._recompute(order_id)
        new = [self.rows[i] for i in self.changed if i not in self.existing]
        old = [self.rows[i] for i in self.changed if i in self.existing]
        insert_rows(self.conn, self.table, new)
        update_rows(self.conn, self.table, "order_id", old)


def _lines_json(lines: dict[str, list[int]]) -> str:
    """``json.dumps(lines, separators=(",", ":"))``, by orjson when that gives the same text.

    orjson writes DEL and non-ASCII characters as they are where json escapes them, and
    refuses integers beyond 64 bits: then the json module writes it, as it always did.
    """
    try:
        encoded = orjson.dumps(lines)
    except TypeError:
        return json.dumps(lines, separators=(",", ":"))
    if not encoded.isascii() or b"\x7f" in encoded:
        return json.dumps(lines, separators=(",", ":"))
    return encoded.decode()


# -- queries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrderSummary:
    """An order as the read model knows it."""

    order_id: str
    status: str
    customer_id: str
    currency: str
    line_count: int
    lines: list[dict[str, Any]]
    total: int
    captured: int
    refunded: int
    refund_due: int
    balance_due: int
    placed_at: datetime
    updated_at: datetime
    version: int
    last_position: int


@dataclass(frozen=True)
class OrderSummaryPage:
    items: list[OrderSummary]
    next_cursor: str | None


def aware(value: datetime) -> datetime:
    """The moment in UTC when the database gave it without a zone (SQLite)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def lines_from(text: str) -> list[dict[str, Any]]:
    """An order_summaries row's lines column as lines: sku, quantity and unit price each."""
    return [
        {"sku": sku, "quantity": quantity, "unit_price": price}
        for sku, (quantity, price) in json.loads(text).items()
    ]


def summary_from(values: Mapping[Any, Any]) -> OrderSummary:
    """An order summary from one order_summaries row, as a mapping of column to value."""
    return OrderSummary(
        order_id=values["order_id"],
        status=values["status"],
        customer_id=values["customer_id"],
        currency=values["currency"],
        line_count=values["line_count"],
        lines=lines_from(values["lines"]),
        total=values["total"],
        captured=values["captured"],
        refunded=values["refunded"],
        refund_due=values["refund_due"],
        balance_due=values["balance_due"],
        placed_at=aware(values["placed_at"]),
        updated_at=aware(values["updated_at"]),
        version=values["version"],
        last_position=values["last_position"],
    )


class InvalidCursorError(ValueError):
    """The pagination cursor was not one this service issued."""


def encode_cursor(placed_at: datetime, order_id: str) -> str:
    raw = json.dumps([aware(placed_at).isoformat(), order_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        placed_at, order_id = json.loads(raw)
        return datetime.fromisoformat(placed_at), str(uuid.UUID(order_id))
    except (ValueError, TypeError) as error:
        raise InvalidCursorError(
            "cursor is malformed; use the one a previous page returned"
        ) from error


def list_order_summaries(
    conn: Connection,
    tables: dict[str, Table],
    *,
    customer_id: str | None = None,
    status: str | None = None,
    placed_from: datetime | None = None,
    placed_to: datetime | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> OrderSummaryPage:
    """Orders newest first, filtered, one keyset page at a time."""
    table = tables["order_summaries"]
    conditions = []
    if customer_id is not None:
        conditions.append(table.c.customer_id == customer_id)
    if status is not None:
        conditions.append(table.c.status == status)
    if placed_from is not None:
        conditions.append(table.c.placed_at >= placed_from)
    if placed_to is not None:
        conditions.append(table.c.placed_at < placed_to)
    if cursor is not None:
        placed_at, order_id = decode_cursor(cursor)
        conditions.append(
            or_(
                table.c.placed_at < placed_at,
                and_(table.c.placed_at == placed_at, table.c.order_id < order_id),
            )
        )
    query = (
        select(table)
        .where(*conditions)
        .order_by(table.c.placed_at.desc(), table.c.order_id.desc())
        .limit(limit + 1)
    )
    rows = [summary_from(row._mapping) for row in conn.execute(query)]
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].placed_at, rows[-1].order_id)
    return OrderSummaryPage(items=rows, next_cursor=next_cursor)
