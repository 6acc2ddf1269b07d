"""orderledger customers: a customer's personal data, its erasure, and the master key."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from api.bootstrap import open_personal_data
from api.cli.common import DatabaseUrlOption, cli_context, opened, reported_errors, settings_from
from api.personal_data import export as export_personal_data
from domain.audit import acting_as
from domain.personal import new_master_key

customers_app = typer.Typer(
    help="A customer's personal data (export, erase) and the master key.", no_args_is_help=True
)

CustomerId = Annotated[str, typer.Argument(help="The customer's id.", show_default=False)]


@customers_app.command("export")
def export(customer_id: CustomerId, database_url: DatabaseUrlOption = None) -> None:
    """Print everything held about the customer, decrypted, as JSON (right of access)."""
    with opened(database_url) as system, reported_errors():
        found = export_personal_data(system.ledger, system.runtime, customer_id)
    typer.echo(json.dumps(found, indent=2, default=str))


@customers_app.command("erase")
def erase(
    customer_id: CustomerId,
    reason: Annotated[
        str, typer.Option("--reason", help="Why: recorded with the erasure.", show_default=False)
    ],
    database_url: DatabaseUrlOption = None,
) -> None:
    """Erase the customer's personal data: delete their data keys and record who and why.

    Events, totals and hash chains stay; their personal values read as [erased] from now on.
    """
    with (
        opened(database_url) as system,
        reported_errors(),
        acting_as(cli_context("customers erase")),
    ):
        result = system.ledger.erase_customer(customer_id, reason=reason)
    typer.echo(
        f"Erased the personal data of customer {result.customer_id}: {result.keys_erased} data "
        f"key(s) deleted, erasure recorded at position {result.position}."
    )


@customers_app.command("rotate-key")
def rotate_key(database_url: DatabaseUrlOption = None) -> None:
    """Re-wrap every data key under ORDERLEDGER_MASTER_KEY (the old key in
    ORDERLEDGER_PREVIOUS_MASTER_KEYS); events are not touched."""
    personal = open_personal_data(settings_from(database_url))
    try:
        with reported_errors():
            count = personal.rotate()
    finally:
        personal.close()
    typer.echo(f"Re-wrapped {count} data key(s) under the current master key.")


@customers_app.command("new-master-key")
def new_key() -> None:
    """Print a new random master key, for ORDERLEDGER_MASTER_KEY."""
    typer.echo(new_master_key())


def register(app: typer.Typer) -> None:
    app.add_typer(customers_app, name="customers")
