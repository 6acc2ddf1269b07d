"""The composition root: every part of orderledger, built from Settings in one place.

The HTTP app's lifespan, every CLI command, the benchmarks and the test fixtures open what they
need here. ``Background`` is what runs beside the requests (the projection worker, the effect
dispatcher and the reconciler); it defines their start-up and shutdown order once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from pydantic import SecretStr

from api.key_store import ApiKeyStore
from api.settings import Settings
from domain.eventstore import event_store_env
from domain.ledger import OrderLedger
from domain.personal import MASTER_KEY_SETTING, MasterKeyError, PersonalData, parse_master_key
from projections.base import Projection
from projections.effects.dispatcher import Dispatcher, DispatchSettings
from projections.effects.outbox import EMAIL, WEBHOOK
from projections.effects.reconciler import Reconciler
from projections.effects.senders import EmailSender, Sender, SmtpSettings, WebhookSender
from projections.effects.service import Effects
from projections.effects.targets import TargetPolicy
from projections.engine.database import read_model_engine, write_transaction
from projections.engine.processor import ProcessorSettings
from projections.engine.runtime import ProjectionRuntime
from projections.engine.worker import Worker, worker_id

# -- the stores ----------------------------------------------------------------------------------


def open_personal_data(settings: Settings) -> PersonalData:
    """Customers' data keys, in the event store's database, under the master key.

    No master key, a malformed one, or one that did not wrap the keys already stored is a
    MasterKeyError naming ORDERLEDGER_MASTER_KEY: personal data is never written unencrypted.
    """
    if settings.master_key is None:
        raise MasterKeyError(
            f"{MASTER_KEY_SETTING} is not set: it encrypts customers' personal data "
            "(make run keeps one in var/master.key; orderledger customers new-master-key "
            "prints a new one)"
        )
    master = parse_master_key(settings.master_key.get_secret_value())
    previous = [
        parse_master_key(text)
        for text in (settings.previous_master_keys or SecretStr("")).get_secret_value().split(",")
        if text.strip()
    ]
    engine = read_model_engine(settings.database_url)
    personal = PersonalData(
        engine,
        master,
        write=partial(write_transaction, engine),
        previous_master_keys=previous,
        cache_ttl=settings.personal_key_cache_ttl,
    )
    try:
        personal.install()
    except BaseException:
        personal.close()
        raise
    return personal


def open_ledger(settings: Settings) -> OrderLedger:
    """The event store and its commands, sealing personal data with the customers' keys."""
    env = event_store_env(settings.database_url)  # a bad URL is refused before anything opens
    personal = open_personal_data(settings)
    try:
        return OrderLedger(env=env, personal=personal)
    except BaseException:
        personal.close()
        raise


def open_key_store(settings: Settings) -> ApiKeyStore:
    """The API keys, in the event store's database."""
    return ApiKeyStore.from_url(settings.database_url, cache_ttl=settings.key_cache_ttl)


def processor_settings(settings: Settings) -> ProcessorSettings:
    return ProcessorSettings(
        batch_size=settings.projection_batch_size, lease_ttl=settings.projection_lease_ttl
    )


def open_read_models(
    settings: Settings, ledger: OrderLedger, projections: Sequence[Projection] | None = None
) -> ProjectionRuntime:
    """The read models (every projection, or the given ones) on the read-model database."""
    return ProjectionRuntime.open(
        ledger,
        settings.read_model_url,
        projections=projections,
        poll_interval=settings.projection_poll_interval,
        settings=processor_settings(settings),
    )


def effects_of(settings: Settings, runtime: ProjectionRuntime) -> Effects:
    """Webhook subscriptions and the outbox, with the configured webhook target policy."""
    return Effects(runtime.engine, runtime.source, settings.webhook_targets)


@dataclass
class Opened:
    """What a command opened: the ledger and the read models."""

    settings: Settings
    ledger: OrderLedger
    runtime: ProjectionRuntime


@contextmanager
def opened(
    settings: Settings, *, projections: Sequence[Projection] | None = None
) -> Iterator[Opened]:
    """Open the ledger and the read models (all, or the given projections), closing them in
    reverse order afterwards."""
    ledger = open_ledger(settings)
    try:
        runtime = open_read_models(settings, ledger, projections)
        try:
            yield Opened(settings, ledger, runtime)
        finally:
            runtime.close()
    finally:
        ledger.close()


# -- side effects --------------------------------------------------------------------------------


def dispatch_settings(settings: Settings) -> DispatchSettings:
    return DispatchSettings(
        max_attempts=settings.effect_max_attempts,
        backoff_base=settings.effect_backoff_base,
        backoff_cap=settings.effect_backoff_cap,
        concurrency=settings.effect_concurrency,
        per_target=settings.effect_per_target,
        claim_ttl=settings.effect_claim_ttl,
    )


def smtp_settings(settings: Settings) -> SmtpSettings:
    password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
    return SmtpSettings(
        host=settings.smtp_host,
        port=settings.smtp_port,
        sender=settings.smtp_from,
        starttls=settings.smtp_starttls,
        username=settings.smtp_username,
        password=password,
        timeout=settings.effect_timeout,
    )


def build_dispatcher(
    runtime: ProjectionRuntime,
    *,
    dispatch: DispatchSettings,
    smtp: SmtpSettings,
    timeout: float,
    targets: TargetPolicy,
    owner: str | None = None,
) -> Dispatcher:
    """A dispatcher delivering webhooks and emails from the runtime's outbox."""
    effects = Effects(runtime.engine, runtime.source, targets)
    senders: dict[str, Sender] = {
        WEBHOOK: WebhookSender(runtime.ledger, effects, timeout=timeout, targets=targets),
        EMAIL: EmailSender(runtime.ledger, SmtpSettings(**{**smtp.__dict__, "timeout": timeout})),
    }
    return Dispatcher(runtime.engine, senders, owner or worker_id(), dispatch)


def dispatcher_for(settings: Settings, runtime: ProjectionRuntime) -> Dispatcher:
    """The dispatcher a process runs, configured by the settings."""
    return build_dispatcher(
        runtime,
        dispatch=dispatch_settings(settings),
        smtp=smtp_settings(settings),
        timeout=settings.effect_timeout,
        targets=settings.webhook_targets,
    )


# -- what runs beside the requests ---------------------------------------------------------------


class _Part(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


@dataclass
class Background:
    """The parts a process runs in threads: started in this order, stopped in reverse.

    The projection worker first (it feeds the outbox), then the dispatcher that delivers from
    the outbox, then the reconciler that checks it; at shutdown the reconciler and dispatcher
    stop before the worker whose effects they handle.
    """

    worker: Worker | None = None
    dispatcher: Dispatcher | None = None
    reconciler: Reconciler | None = None

    def _parts(self) -> list[_Part]:
        parts = (self.worker, self.dispatcher, self.reconciler)
        return [part for part in parts if part is not None]

    def start(self) -> None:
        for part in self._parts():
            part.start()

    def stop(self) -> None:
        for part in reversed(self._parts()):
            part.stop()


def background(
    settings: Settings,
    runtime: ProjectionRuntime,
    *,
    only: Sequence[str] | None = None,
    projections: bool = True,
    effects: bool = True,
) -> Background:
    """What this process runs: projections (all or ``only``), and effects if configured.

    Raises UnknownProjectionError for a name in ``only`` that no projection has.
    """
    worker = runtime.worker(only, idle_wait=settings.projection_idle_wait)
    if not (effects and settings.run_effects):
        return Background(worker if projections else None)
    return Background(
        worker if projections else None,
        dispatcher_for(settings, runtime),
        Reconciler(effects_of(settings, runtime), settings.effect_reconcile_interval),
    )
