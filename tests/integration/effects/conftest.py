"""Fixtures for side-effect tests: the outbox on a real store, a real webhook receiver on
loopback, a real SMTP server (aiosmtpd), and helpers to record and deliver effects."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import pytest

from api.bootstrap import build_dispatcher
from domain.ledger import OrderLedger
from projections.effects.dispatcher import Dispatcher, DispatchSettings
from projections.effects.senders import SmtpSettings
from projections.effects.service import Effects
from projections.engine.runtime import ProjectionRuntime
from tests.support.effects import FAST
from tests.support.ports import free_port
from tests.support.projections import run_until_caught_up
from tests.support.receivers import LOCAL_TARGETS

# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def effects_service(runtime: ProjectionRuntime) -> Effects:
    """Subscriptions, the outbox's contents and retries."""
    return Effects(runtime.engine, runtime.source, LOCAL_TARGETS)


@pytest.fixture
def catch_up(runtime: ProjectionRuntime) -> Callable[..., None]:
    """Run a worker until the named projections (default: the outbox) serve at the head."""

    def run(only: Sequence[str] = ("outbox",)) -> None:
        run_until_caught_up(runtime, list(only))

    return run


@pytest.fixture
def make_dispatcher(
    runtime: ProjectionRuntime, ledger: OrderLedger
) -> Iterator[Callable[..., Dispatcher]]:
    """Build dispatchers wired as in production (webhook and email senders); stopped after."""
    made: list[Dispatcher] = []
    unused = free_port()

    def make(
        settings: DispatchSettings = FAST,
        *,
        owner: str | None = None,
        smtp: SmtpSettings | None = None,
        timeout: float = 5.0,
    ) -> Dispatcher:
        dispatcher = build_dispatcher(
            runtime,
            dispatch=settings,
            smtp=smtp or SmtpSettings(host="127.0.0.1", port=unused),
            timeout=timeout,
            targets=LOCAL_TARGETS,
            owner=owner,
        )
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        dispatcher.stop()
        for sender in dispatcher.senders.values():
            with contextlib.suppress(Exception):
                sender.close()  # type: ignore[attr-defined]
