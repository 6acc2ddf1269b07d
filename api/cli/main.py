"""The orderledger command line (typer): every command group registers here."""

from __future__ import annotations

import typer
from eventsourcing.persistence import PersistenceError
from pydantic import ValidationError
from rich.console import Console

from api.cli import audit, customers, keys, operate, orders, serve, webhooks
from api.cli.common import EXIT_FAILURE, EXIT_USAGE, settings_problem
from domain.errors import InvalidCommandError, OrderLedgerError

app = typer.Typer(
    help="orderledger: an event-sourced order ledger.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """orderledger: an event-sourced order ledger."""


for group in (serve, orders, audit, customers, operate, webhooks, keys):
    group.register(app)


def _last_resort(error: Exception) -> tuple[str, int]:
    """A message and exit code for an error that escaped a command."""
    if isinstance(error, ValidationError):
        return settings_problem(error), EXIT_USAGE
    if isinstance(error, InvalidCommandError):
        return str(error), EXIT_USAGE
    if isinstance(error, OrderLedgerError | OSError):
        return str(error), EXIT_FAILURE
    if isinstance(error, PersistenceError):
        return f"the event store failed: {error}", EXIT_FAILURE
    if isinstance(error, ValueError):
        return str(error), EXIT_USAGE
    return f"unexpected {type(error).__name__}: {error}", EXIT_FAILURE


def main() -> None:
    """Entry point of the `orderledger` console script."""
    try:
        app()
    except Exception as error:  # commands catch what they expect; this keeps tracebacks out
        message, code = _last_resort(error)
        Console(stderr=True, highlight=False).print(
            f"Error: {message}", markup=False, soft_wrap=True
        )
        raise SystemExit(code) from None


if __name__ == "__main__":
    main()
