"""orderledger webhooks and effects: subscriptions, the outbox, retries and reconciling."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Console

from api.bootstrap import effects_of
from api.cli.common import EXIT_USAGE, DatabaseUrlOption, fail, opened
from api.cli.tables import Column, JsonOption, Listing, show
from projections.effects.outbox import CANCELLED, DEAD, DELIVERED, PENDING
from projections.effects.service import (
    EffectNotDeadError,
    EffectNotFoundError,
    Effects,
    InvalidSubscriptionError,
)

log = logging.getLogger("orderledger.effects")


webhooks_app = typer.Typer(help="Webhook subscriptions: add, list, remove.", no_args_is_help=True)
effects_app = typer.Typer(
    help="Side effects in the outbox: list, retry dead ones, reconcile.", no_args_is_help=True
)


class StatusChoice(StrEnum):
    pending = PENDING
    delivered = DELIVERED
    dead = DEAD
    cancelled = CANCELLED


@contextmanager
def _effects(database_url: str | None) -> Iterator[Effects]:
    """The outbox of the configured store, with expected failures as one line and an exit code."""
    with opened(database_url) as system:
        yield effects_of(system.settings, system.runtime)


def _time(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return (
        datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


# -- webhooks -------------------------------------------------------------------------------


@webhooks_app.command("add")
def add_webhook(
    url: Annotated[str, typer.Argument(help="http(s) URL to POST events to.", show_default=False)],
    event: Annotated[
        list[str] | None,
        typer.Option("--event", "-e", help="Event type to send (repeatable; default every type)."),
    ] = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Subscribe a URL to events recorded from now on; prints its signing secret once."""
    with _effects(database_url) as effects:
        try:
            created = effects.add_subscription(url, event or ["*"])
        except InvalidSubscriptionError as error:
            fail(str(error), EXIT_USAGE)
    out = Console(highlight=False)
    subscription = created.subscription
    out.print(f"Subscription {subscription.id}", markup=False)
    out.print(f"  URL:         {subscription.url}", markup=False, soft_wrap=True)
    out.print(f"  Event types: {', '.join(subscription.event_types)}", markup=False)
    out.print(f"  Secret:      {created.secret}", markup=False, soft_wrap=True)
    out.print("The secret is shown only now: store it to verify webhook-signature headers.")


@webhooks_app.command("list")
def list_webhooks(
    include_inactive: Annotated[
        bool, typer.Option("--all", help="Include removed subscriptions.")
    ] = False,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List subscriptions (never their secrets)."""
    with _effects(database_url) as effects:
        views = effects.subscription_views(include_inactive=include_inactive)
    rows = [
        {
            "id": view.id,
            "url": view.url,
            "event_types": list(view.event_types),
            "active": view.active,
            "created_at": _time(view.created_at),
        }
        for view in views
    ]
    columns = [
        # Ids are copied into other commands: never cut or wrapped.
        Column("id", whole=True),
        Column("url"),
        Column("event_types", "event types"),
        Column("active"),
        Column("created_at", "created (UTC)"),
    ]
    listing = Listing(
        "subscriptions",
        "webhook subscriptions",
        columns,
        rows,
        footer=f"{len(views)} subscription(s)",
    )
    show(listing, as_json=as_json)


@webhooks_app.command("remove")
def remove_webhook(
    subscription_id: Annotated[
        str, typer.Argument(help="The subscription's id.", metavar="ID", show_default=False)
    ],
    database_url: DatabaseUrlOption = None,
) -> None:
    """Stop recording deliveries for a subscription; those already recorded still go out."""
    with _effects(database_url) as effects:
        try:
            effects.remove_subscription(subscription_id)
        except EffectNotFoundError as error:
            fail(str(error))
    Console(highlight=False).print(f"Removed subscription {subscription_id}", markup=False)


# -- effects --------------------------------------------------------------------------------


@effects_app.command("list")
def list_effects(
    status: Annotated[
        StatusChoice | None, typer.Option("--status", help="Only effects in this state.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100_000, help="Most rows.")] = 100,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List effects in position order: what, for which order, how far delivery got."""
    with _effects(database_url) as effects:
        views = effects.find(status=None if status is None else status.value, limit=limit)
    rows = [
        {
            "id": view.id,
            "effect": view.effect,
            "order_id": view.order_id,
            "position": view.position,
            "status": view.status,
            "attempts": view.attempts,
            "last_error": view.last_error,
        }
        for view in views
    ]
    columns = [
        Column("id", whole=True),
        Column("effect"),
        Column("order_id", "order"),
        Column("position", numeric=True),
        Column("status"),
        Column("attempts", numeric=True),
        Column("last_error", "last error", text=lambda error: error or ""),
    ]
    show(
        Listing("effects", "effects", columns, rows, footer=f"{len(views)} effect(s)"),
        as_json=as_json,
    )


@effects_app.command("retry")
def retry_effects(
    effect_id: Annotated[
        str | None,
        typer.Argument(help="The dead effect's id.", metavar="[ID]", show_default=False),
    ] = None,
    all_dead: Annotated[bool, typer.Option("--all-dead", help="Retry every dead effect.")] = False,
    target: Annotated[
        str | None,
        typer.Option(
            help="With --all-dead: only those of this target: a webhook's URL, email (every "
            "email) or email:<customer id> (one customer's)."
        ),
    ] = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Send dead effects again with a fresh set of attempts (a running worker delivers them)."""
    if (effect_id is None) == (not all_dead):
        fail("give an effect ID or --all-dead (not both)", EXIT_USAGE)
    if target is not None and not all_dead:
        fail("--target goes with --all-dead", EXIT_USAGE)
    out = Console(highlight=False)
    with _effects(database_url) as effects:
        if effect_id is None:
            count = effects.retry_all_dead(target=target)
            of = f" of {target}" if target is not None else ""
            out.print(f"{count} dead effect(s){of} will be sent again.")
            return
        try:
            view = effects.retry(effect_id)
        except (EffectNotFoundError, EffectNotDeadError) as error:
            fail(str(error))
    out.print(f"Effect {view.id} ({view.effect}) is {view.status}: it will be sent again.")


@effects_app.command("reconcile")
def reconcile_effects(database_url: DatabaseUrlOption = None) -> None:
    """Record effects that recorded events should have triggered but the outbox lacks."""
    with _effects(database_url) as effects:
        recorded = effects.reconcile()
    Console(highlight=False).print(f"Reconciled: recorded {recorded} missing effect(s).")


def register(app: typer.Typer) -> None:
    """Add the webhooks and effects command groups to the main CLI."""
    app.add_typer(webhooks_app, name="webhooks")
    app.add_typer(effects_app, name="effects")
