"""The orderledger command line (typer)."""

from __future__ import annotations

import typer

app = typer.Typer(help="orderledger: an event-sourced order ledger.", no_args_is_help=True)


@app.callback()
def _root() -> None:
    """orderledger: an event-sourced order ledger."""


def main() -> None:
    app()
