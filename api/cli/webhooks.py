"""CLI commands for side effects: webhook subscriptions, the outbox, retries and reconciling.

Also the periodic reconcile pass that `orderledger worker` and `orderledger serve` run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, NoReturn

import typer
from eventsourcing.persistence import PersistenceError
from pydantic import ValidationError
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from api.cli.tables import Column, JsonOption, Listing, show
from api.settings import Settings
from domain.ledger import OrderLedger
from projections.effects.outbox import DEAD, DELIVERED, PENDING
from projections.effects.service import (
    EffectNotDeadError,
    EffectNotFoundError,
    Effects,
    InvalidSubscriptionError,
)
from projections.engine.runtime import ProjectionRuntime

log = logging.getLogger("orderledger.effects")

EXIT_FAILURE = 1
EXIT_USAGE = 2

webhooks_app = typer.Typer(help="Webhook subscriptions: add, list, remove.", no_args_is_help=True)
effects_app = typer.Typer(
    help="Side effects in the outbox: list, retry dead ones, reconcile.", no_args_is_help=True
)

DatabaseOption = Annotated[
    str | None,
    typer.Option("--database-url", help="Overrides ORDERLEDGER_DATABASE_URL.", show_default=False),
]


class StatusChoice(StrEnum):
    pending = PENDING
    delivered = DELIVERED
    dead = DEAD


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    Console(stderr=True, highlight=False).print(f"Error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def configured(database_url: str | None) -> Settings:
    """Settings from the environment, --database-url winning; bad settings are one line."""
    try:
        return Settings() if database_url is None else Settings(database_url=database_url)
    except ValidationError as error:
        _fail(f"invalid settings: {error.errors()[0]['msg']}", EXIT_USAGE)


@contextmanager
def _effects(database_url: str | None) -> Iterator[Effects]:
    """The outbox of the configured store, with expected failures as one line and an exit code."""
    settings = configured(database_url)
    try:
        ledger = OrderLedger.from_url(settings.database_url)
    except ValueError as error:
        _fail(f"bad database URL: {error}", EXIT_USAGE)
    except (PersistenceError, OSError) as error:
        _fail(f"cannot open the event store: {error}")
    try:
        # Only the outbox is touched here, so the processors' settings do not matter.
        runtime = ProjectionRuntime.open(ledger, settings.read_model_url)
        try:
            yield Effects(runtime.engine, runtime.source, settings.webhook_targets)
        finally:
            runtime.close()
    except (SQLAlchemyError, PersistenceError) as error:
        _fail(f"the database failed: {type(error).__name__}")
    finally:
        ledger.close()


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
    database_url: DatabaseOption = None,
) -> None:
    """Subscribe a URL to events recorded from now on; prints its signing secret once."""
    with _effects(database_url) as effects:
        try:
            created = effects.add_subscription(url, event or ["*"])
        except InvalidSubscriptionError as error:
            _fail(str(error), EXIT_USAGE)
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
    database_url: DatabaseOption = None,
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
    database_url: DatabaseOption = None,
) -> None:
    """Stop recording deliveries for a subscription; those already recorded still go out."""
    with _effects(database_url) as effects:
        try:
            effects.remove_subscription(subscription_id)
        except EffectNotFoundError as error:
            _fail(str(error))
    Console(highlight=False).print(f"Removed subscription {subscription_id}", markup=False)


# -- effects --------------------------------------------------------------------------------


@effects_app.command("list")
def list_effects(
    status: Annotated[
        StatusChoice | None, typer.Option("--status", help="Only effects in this state.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100_000, help="Most rows.")] = 100,
    database_url: DatabaseOption = None,
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
    database_url: DatabaseOption = None,
) -> None:
    """Send dead effects again with a fresh set of attempts (a running worker delivers them)."""
    if (effect_id is None) == (not all_dead):
        _fail("give an effect ID or --all-dead (not both)", EXIT_USAGE)
    out = Console(highlight=False)
    with _effects(database_url) as effects:
        if effect_id is None:
            count = effects.retry_all_dead()
            out.print(f"{count} dead effect(s) will be sent again.")
            return
        try:
            view = effects.retry(effect_id)
        except (EffectNotFoundError, EffectNotDeadError) as error:
            _fail(str(error))
    out.print(f"Effect {view.id} ({view.effect}) is {view.status}: it will be sent again.")


@effects_app.command("reconcile")
def reconcile_effects(database_url: DatabaseOption = None) -> None:
    """Record effects that recorded events should have triggered but the outbox lacks."""
    with _effects(database_url) as effects:
        recorded = effects.reconcile()
    Console(highlight=False).print(f"Reconciled: recorded {recorded} missing effect(s).")


def register(app: typer.Typer) -> None:
    """Add the webhooks and effects command groups to the main CLI."""
    app.add_typer(webhooks_app, name="webhooks")
    app.add_typer(effects_app, name="effects")


# -- the periodic reconcile pass --------------------------------------------------------------


class Reconciler:
    """Runs a reconcile pass every ``interval`` seconds in a background thread.

    In a healthy system each pass records nothing; a non-zero count means the outbox lost rows
    (a restore from an older backup, say) and they are now pending again.
    """

    def __init__(self, effects: Effects, interval: float) -> None:
        self.effects = effects
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="orderledger-reconcile", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            self.run_once()

    def run_once(self) -> int | None:
        """One pass; returns how many effects it recorded (None if the pass failed)."""
        try:
            recorded = self.effects.reconcile()
        except Exception:
            log.exception("reconcile pass failed; trying again next interval")
            return None
        log.info("reconcile pass recorded %d effect(s)", recorded, extra={"recorded": recorded})
        return recorded
