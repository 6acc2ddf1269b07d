"""Fixtures for projection tests: a ledger and a projection runtime on the same real store."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import eventsourcing.domain
import pytest

from domain.ledger import OrderLedger
from projections.engine.runtime import ProjectionRuntime
from tests.support.orders import OrderMix
from tests.support.projections import LedgerClock, run_until_caught_up

CatchUp = Callable[..., None]


@pytest.fixture
def catch_up(runtime: ProjectionRuntime) -> CatchUp:
    """Run a worker until the named projections (default: all) serve at the head.

    ``catch_up()``, ``catch_up(["daily_sales"])``, ``catch_up(batch_size=7)``. Fails the test
    if a generation stopped on an event, naming the event and the error.
    """

    def run(only: Sequence[str] | None = None, *, batch_size: int | None = None) -> None:
        run_until_caught_up(runtime, only, batch_size=batch_size)

    return run


@pytest.fixture
def ledger_clock(monkeypatch: pytest.MonkeyPatch) -> LedgerClock:
    """Stamps new events with a moment the test sets (the library's clock, not ours).

    Starts at 2024-03-30 18:00 UTC; ``ledger_clock.advance(hours=7)`` or assign ``.now``.
    """
    clock = LedgerClock(datetime(2024, 3, 30, 18, 0, tzinfo=UTC))
    monkeypatch.setattr(eventsourcing.domain, "datetime_now_with_tzinfo", clock)
    return clock


@pytest.fixture
def order_mix(ledger: OrderLedger, ledger_clock: LedgerClock) -> OrderMix:
    """Places a realistic interleaved mix of orders over several days; logs every command.

    ``order_mix.place(24)`` returns the commands it issued; ``order_mix.log`` holds them all.
    """
    return OrderMix(ledger, ledger_clock)
