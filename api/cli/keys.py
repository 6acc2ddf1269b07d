"""CLI commands for API keys: create (the token is printed once), list, revoke, bootstrap."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.console import Console

from api.cli.common import EXIT_USAGE, DatabaseUrlOption, fail, key_store
from api.cli.tables import Column, JsonOption, Listing, show
from api.key_store import IssuedKey, KeyNotFoundError, Role
from api.settings import Settings

keys_app = typer.Typer(
    help="API keys: create, list, revoke; bootstrap the first admin key.", no_args_is_help=True
)


def _time(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.strftime("%Y-%m-%d %H:%M")


def _print_issued(issued: IssuedKey, settings: Settings) -> None:
    out = Console(highlight=False)
    out.print(f"API key {issued.key_id} ({issued.name}), role {issued.role}:", markup=False)
    out.print(f"  {issued.token}", markup=False, soft_wrap=True)
    out.print("The key is shown only now: store it; the server keeps only its hash.")
    out.print(
        f'Try: curl -H "Authorization: Bearer {issued.token}" '
        f"http://{settings.host}:{settings.port}/orders",
        markup=False,
        soft_wrap=True,
    )


@keys_app.command("create")
def create_key(
    role: Annotated[Role, typer.Option("--role", help="What the key may do.", show_default=False)],
    name: Annotated[
        str, typer.Option("--name", help="A label for people (default: generated).")
    ] = "",
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print the token alone, for scripts.")
    ] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Create a key with a role; its token is printed once and never stored."""
    with key_store(database_url) as (store, settings):
        try:
            issued = store.create(role, name)
        except ValueError as error:
            fail(str(error), EXIT_USAGE)
    if quiet:
        typer.echo(issued.token)
        return
    _print_issued(issued, settings)


@keys_app.command("list")
def list_keys(database_url: DatabaseUrlOption = None, as_json: JsonOption = False) -> None:
    """List every key, active and revoked (never a token)."""
    with key_store(database_url) as (store, _settings):
        keys = store.list()
    rows = [
        {
            "key_id": key.key_id,
            "name": key.name,
            "role": str(key.role),
            "status": "active" if key.active else "revoked",
            "created_at": key.created_at,
            "last_used_at": key.last_used_at,
        }
        for key in keys
    ]
    columns = [
        Column("key_id", "Key id", whole=True),
        Column("name", "Name"),
        Column("role", "Role"),
        Column("status", "Status"),
        Column("created_at", "Created", text=_time),
        Column("last_used_at", "Last used", text=_time),
    ]
    active = sum(key.active for key in keys)
    listing = Listing(
        "keys",
        "API keys (times in UTC)",
        columns,
        rows,
        footer=f"{len(keys)} key(s), {active} active.",
        empty="No API keys yet; create the first with: orderledger keys bootstrap",
    )
    show(listing, as_json=as_json)


@keys_app.command("revoke")
def revoke_key(
    key_id: Annotated[
        str, typer.Argument(help="The key's id, from `keys list`.", show_default=False)
    ],
    database_url: DatabaseUrlOption = None,
) -> None:
    """Revoke a key: every API process refuses it within ORDERLEDGER_KEY_CACHE_TTL (1 s)."""
    with key_store(database_url) as (store, settings):
        try:
            key = store.revoke(key_id)
        except KeyNotFoundError as error:
            fail(str(error))
    Console(highlight=False).print(
        f"Revoked key {key.key_id} ({key.name}, {key.role}); API processes refuse it within "
        f"{settings.key_cache_ttl:g} s.",
        markup=False,
    )


@keys_app.command("bootstrap")
def bootstrap(database_url: DatabaseUrlOption = None) -> None:
    """Create an admin key if the store has none yet, and print it with a curl example."""
    with key_store(database_url) as (store, settings):
        issued = store.create_first_admin()
    if issued is None:
        Console(highlight=False).print(
            "API keys already exist; none created. Another: orderledger keys create --role admin"
        )
        return
    _print_issued(issued, settings)


def register(app: typer.Typer) -> None:
    """Add the keys command group to the main CLI."""
    app.add_typer(keys_app, name="keys")
