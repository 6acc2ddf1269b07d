"""orderledger demo and audit history: record demo orders, print an order's history."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from api.demo import SCENARIOS, populate
from domain.ledger import HistoryEntry
from domain.money import MINOR_UNITS
from domain.order import Order

if TYPE_CHECKING:
    pass

from api.cli.common import (
    EXIT_USAGE,
    DatabaseUrlOption,
    cli_context,
    fail,
    open_ledger_or_fail,
    parse_moment,
    redacted,
    reported_errors,
    settings_from,
    stdout,
)
from domain.audit import acting_as


def format_money(amount: int, currency: str) -> str:
    """Minor units as a readable amount: 123450 EUR -> 'EUR 1,234.50', 1800 JPY -> 'JPY 1,800'."""
    exponent = MINOR_UNITS.get(currency, 2)
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(amount), 10**exponent)
    text = f"{currency} {sign}{whole:,}"
    return f"{text}.{fraction:0{exponent}d}" if exponent else text


# -- demo -------------------------------------------------------------------------------------


def demo(
    orders: Annotated[int, typer.Option("--orders", "-n", help="How many orders to record.")] = 200,
    if_empty: Annotated[
        bool, typer.Option("--if-empty", help="Do nothing when the store already has events.")
    ] = False,
    seed: Annotated[
        int | None, typer.Option(help="Random seed; the same seed records the same orders.")
    ] = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Record realistic demo orders across the whole order lifecycle."""
    if orders < 1:
        fail(f"--orders must be 1 or more, got {orders}", EXIT_USAGE)
    settings = settings_from(database_url)
    out = stdout()
    ledger = open_ledger_or_fail(settings)
    try:
        with reported_errors():
            head = ledger.head_position()
            if if_empty and head > 0:
                out.print(
                    f"The store at {redacted(settings.database_url)} already has {head} "
                    "events; --if-empty: no demo orders recorded."
                )
                return
            with Progress(
                SpinnerColumn(),
                TextColumn("Recording demo orders"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=out,
                transient=False,
            ) as progress:
                task = progress.add_task("demo", total=orders)
                with acting_as(cli_context("demo")):
                    result = populate(
                        ledger,
                        orders=orders,
                        seed=seed,
                        on_order=lambda _scenario: progress.advance(task),
                    )
    finally:
        ledger.close()
    table = Table(title="Demo orders by how they ended", title_justify="left")
    table.add_column("Scenario")
    table.add_column("Orders", justify="right")
    for scenario in SCENARIOS:
        table.add_row(scenario.name.replace("_", " "), str(result.outcomes[scenario.name]))
    out.print(table)
    out.print(
        f"Recorded {len(result.order_ids)} orders ({result.events} events) "
        f"in {redacted(settings.database_url)}."
    )
    out.print(f"Try: orderledger audit {result.order_ids[-1]}", soft_wrap=True)


# -- audit ------------------------------------------------------------------------------------


def parse_order_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        fail(f"{text!r} is not an order id (a UUID such as {UUID(int=0)})", EXIT_USAGE)


def _lines_summary(lines: list[dict[str, Any]], currency: str) -> str:
    return ", ".join(
        f"{line['quantity']} x {line['sku']} @ {format_money(line['unit_price'], currency)}"
        for line in lines
    )


def _placed_summary(data: dict[str, Any], currency: str) -> str:
    parts = [data["customer_id"], _lines_summary(data["lines"], currency)]
    if data.get("client_reference"):
        parts.append(f"ref {data['client_reference']}")
    return " | ".join(parts)


_SUMMARIES: dict[str, Callable[[dict[str, Any], str], str]] = {
    "OrderPlaced": _placed_summary,
    "OrderLineAdded": lambda data, currency: _lines_summary([data], currency),
    "OrderLineRemoved": lambda data, _: str(data["sku"]),
    "PaymentCaptured": lambda data, currency: (
        f"{format_money(data['amount'], currency)} | ref {data['payment_reference']}"
    ),
    "OrderShipped": lambda data, _: f"{data['carrier']} {data['tracking_number']}",
    "OrderCancelled": lambda data, _: str(data["reason"]),
    "RefundIssued": lambda data, currency: (
        f"{format_money(data['amount'], currency)} | {data['reason']}"
    ),
}


def _event_summary(entry: HistoryEntry, currency: str) -> str:
    summary = _SUMMARIES.get(entry.type)
    if summary is not None:
        return summary(entry.data, currency)
    return ", ".join(f"{key}={value}" for key, value in entry.data.items()) or "-"


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _history_table(history: list[HistoryEntry], order: Order) -> Table:
    shown = [entry for entry in history if entry.version <= order.version]
    later = len(history) - len(shown)
    caption = f"{later} later event(s) not shown" if later else None
    table = Table(
        title=f"History of order {order.id}",
        title_justify="left",
        caption=caption,
        caption_justify="left",
    )
    table.add_column("Position", justify="right")
    table.add_column("Version", justify="right")
    table.add_column("Event")
    table.add_column("Recorded at (UTC)")
    table.add_column("Details")
    for entry in shown:
        table.add_row(
            str(entry.position),
            str(entry.version),
            entry.type,
            _time(entry.timestamp),
            Text(_event_summary(entry, order.currency)),
        )
    return table


def _recorded_by_table(history: list[HistoryEntry], order: Order) -> Table:
    """Who recorded each event shown, on which request, in which conversation."""
    table = Table(title="Recorded by", title_justify="left")
    table.add_column("Version", justify="right")
    table.add_column("Actor")
    table.add_column("Request")
    table.add_column("Correlation")
    table.add_column("Command")
    for entry in history:
        if entry.version > order.version:
            continue
        metadata = entry.metadata
        actor = metadata["actor"]
        who = f"{actor['kind']} {actor['id']}"
        if actor.get("name"):
            who += f" ({actor['name']}{', ' + actor['role'] if actor.get('role') else ''})"
        table.add_row(
            str(entry.version),
            who,
            metadata["request_id"],
            metadata["correlation_id"],
            metadata["causation_id"],
        )
    return table


def _state_table(order: Order, *, latest_version: int) -> Table:
    label = "latest" if order.version == latest_version else f"of {latest_version}"
    table = Table(
        title=f"State at version {order.version} ({label})",
        title_justify="left",
        show_header=False,
    )
    table.add_column("Field", style="bold")
    table.add_column("Value")
    money = order.currency
    rows: list[tuple[str, str | None]] = [
        ("Status", order.status),
        ("Customer", order.customer_id),
        ("Currency", order.currency),
        ("Total", format_money(order.total, money)),
        ("Captured", format_money(order.captured, money)),
        ("Refunded", format_money(order.refunded, money)),
        ("Balance due", format_money(order.balance_due, money)),
        ("Refund due", format_money(order.refund_due, money)),
        ("Payments", ", ".join(order.payment_references) or None),
        ("Ship to", order.shipping_address),
        ("Client reference", order.client_reference),
        ("Carrier", f"{order.carrier} {order.tracking_number}" if order.carrier else None),
        ("Cancellation reason", order.cancellation_reason),
        ("Updated at (UTC)", _time(order.modified_on)),
    ]
    for name, value in rows:
        if value is not None:
            table.add_row(name, Text(value))
    return table


def _lines_table(order: Order) -> Table:
    table = Table(title="Lines", title_justify="left")
    table.add_column("SKU")
    table.add_column("Quantity", justify="right")
    table.add_column("Unit price", justify="right")
    table.add_column("Amount", justify="right")
    for line in order.lines.values():
        table.add_row(
            line.sku,
            str(line.quantity),
            format_money(line.unit_price, order.currency),
            format_money(line.amount, order.currency),
        )
    return table


def audit(
    order_id: Annotated[
        str, typer.Argument(help="The order's id (a UUID).", metavar="ORDER_ID", show_default=False)
    ],
    at_version: Annotated[
        int | None,
        typer.Option("--at-version", help="Show the order as it was at this version."),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            help="Show the order as it was at this ISO 8601 time (with timezone).",
            show_default=False,
        ),
    ] = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Print an order's recorded history and the state it results in."""
    uuid = parse_order_id(order_id)
    if at_version is not None and at is not None:
        fail("give either --at-version or --at, not both", EXIT_USAGE)
    moment = parse_moment(at, "--at") if at is not None else None
    settings = settings_from(database_url)
    ledger = open_ledger_or_fail(settings)
    try:
        with reported_errors():
            history = ledger.order_history(uuid)
            order = ledger.order_as_of(uuid, version=at_version, at=moment)
    finally:
        ledger.close()
    out = stdout()
    out.print(_history_table(history, order))
    out.print(_recorded_by_table(history, order))
    out.print(_state_table(order, latest_version=history[-1].version))
    out.print(_lines_table(order))


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
