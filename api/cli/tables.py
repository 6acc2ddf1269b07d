"""One way every status and list command prints: a table that fits the terminal, or --json."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the same data as JSON, for scripts.")
]


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list):
        return ", ".join(str(each) for each in value)
    return str(value)


@dataclass(frozen=True)
class Column:
    key: str
    header: str | None = None
    numeric: bool = False
    whole: bool = False
    """Never wrapped or cut (names and ids people read or copy); other columns fold to fit."""
    text: Callable[[Any], str] = _text


@dataclass(frozen=True)
class Listing:
    key: str
    """The listing's key in the JSON document when a command prints several."""
    title: str
    columns: Sequence[Column]
    rows: Sequence[dict[str, Any]]
    footer: str | None = None
    empty: str | None = None
    """Printed instead of an empty table."""
    notes: Sequence[str] = field(default_factory=tuple)


def _table(listing: Listing) -> Table:
    # No vertical rules: at 80 columns every character goes to the data.
    table = Table(title=listing.title, title_justify="left")
    for column in listing.columns:
        cells = [column.text(row[column.key]) for row in listing.rows]
        header = column.header or column.key
        table.add_column(
            header,
            justify="right" if column.numeric else "left",
            no_wrap=column.whole,
            min_width=max([len(header), *map(len, cells)]) if column.whole else None,
            overflow="fold",
        )
    for row in listing.rows:
        table.add_row(*(column.text(row[column.key]) for column in listing.columns))
    return table


def show(*listings: Listing, as_json: bool) -> None:
    """Print the listings as tables (rich reads the width from COLUMNS), or as one JSON document.

    JSON: one listing's rows as an array; several as an object of arrays keyed by listing.
    """
    if as_json:
        document: Any = (
            list(listings[0].rows)
            if len(listings) == 1
            else {listing.key: list(listing.rows) for listing in listings}
        )
        typer.echo(json.dumps(document, default=_json_value, indent=2))
        return
    out = Console(highlight=False)
    for listing in listings:
        if not listing.rows and listing.empty is not None:
            out.print(listing.empty, markup=False)
            continue
        out.print(_table(listing))
        if listing.footer is not None:
            out.print(listing.footer, markup=False)
        for note in listing.notes:
            out.print(note)
