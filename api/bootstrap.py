"""Side effects inside a running process: the dispatcher, configured from Settings."""

from __future__ import annotations

from api.settings import Settings
from domain.ledger import OrderLedger
from projections.effects.dispatcher import Dispatcher, DispatchSettings
from projections.effects.runtime import build_dispatcher
from projections.effects.senders import SmtpSettings
from projections.engine.runtime import ProjectionRuntime


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


def dispatcher_for(
    settings: Settings, runtime: ProjectionRuntime, ledger: OrderLedger
) -> Dispatcher:
    """The dispatcher this process runs, delivering from the runtime's outbox."""
    return build_dispatcher(
        runtime,
        ledger,
        dispatch=dispatch_settings(settings),
        smtp=smtp_settings(settings),
        timeout=settings.effect_timeout,
        targets=settings.webhook_targets,
    )
