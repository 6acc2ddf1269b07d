"""Wiring the dispatcher: senders for each kind of effect, on the projection runtime."""

from __future__ import annotations

from domain.ledger import OrderLedger
from projections.effects.dispatcher import Dispatcher, DispatchSettings
from projections.effects.outbox import EMAIL, WEBHOOK
from projections.effects.senders import EmailSender, Sender, SmtpSettings, WebhookSender
from projections.effects.service import Effects
from projections.effects.targets import TargetPolicy
from projections.engine.runtime import ProjectionRuntime
from projections.engine.worker import worker_id


def build_dispatcher(
    runtime: ProjectionRuntime,
    ledger: OrderLedger,
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
        WEBHOOK: WebhookSender(ledger, effects, timeout=timeout, targets=targets),
        EMAIL: EmailSender(ledger, SmtpSettings(**{**smtp.__dict__, "timeout": timeout})),
    }
    return Dispatcher(runtime.engine, senders, owner or worker_id(), dispatch)
