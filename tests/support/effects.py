"""The outbox in tests: its rows and attempts, delivering until done, orders that cause effects."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import Engine, select

from domain.ledger import OrderLedger
from projections.effects.dispatcher import Dispatcher, DispatchSettings
from projections.effects.outbox import PENDING, attempts, effects

CatchUp = Callable[..., None]
"""The ``catch_up`` fixture: run the named projections (default: the outbox) to the head."""
MakeDispatcher = Callable[..., Dispatcher]
"""The ``make_dispatcher`` fixture: a dispatcher wired as in production, stopped after."""

FAST = DispatchSettings(
    max_attempts=6, backoff_base=0.02, backoff_cap=0.5, claim_ttl=30.0, idle_wait=0.02
)
"""Short backoff so retries happen within a test's time."""


# -- the outbox ----------------------------------------------------------------------------------


def outbox_rows(engine: Engine) -> list[dict[str, Any]]:
    """Every outbox row, in position order."""
    with engine.connect() as conn:
        rows = conn.execute(select(effects).order_by(effects.c.position, effects.c.effect))
        return [dict(row._mapping) for row in rows]


def attempt_rows(engine: Engine, effect_id: str) -> list[dict[str, Any]]:
    """The recorded attempts of one effect, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(attempts).where(attempts.c.effect_id == effect_id).order_by(attempts.c.attempt)
        )
        return [dict(row._mapping) for row in rows]


def pending_count(engine: Engine) -> int:
    return sum(1 for row in outbox_rows(engine) if row["status"] == PENDING)


def deliver_until(dispatcher: Dispatcher, done: Callable[[], bool], timeout: float = 20.0) -> None:
    """Run the dispatcher in this thread until ``done()``; waits out backoff by polling."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"effects were not delivered within {timeout}s")
        if dispatcher.run_once() == 0:
            time.sleep(0.01)


def settle(dispatcher: Dispatcher, engine: Engine, timeout: float = 20.0) -> None:
    """Deliver until no effect is pending (each is delivered or dead)."""
    deliver_until(dispatcher, lambda: pending_count(engine) == 0, timeout)


LINES = ({"sku": "MUG-1", "quantity": 2, "unit_price": 1250},)


def place(
    ledger: OrderLedger,
    *,
    email: str | None = None,
    currency: str = "EUR",
    lines: Sequence[dict[str, Any]] = LINES,
    reference: str | None = None,
) -> UUID:
    """Place an order; returns its id."""
    return ledger.place_order(
        customer_id="cust-1",
        currency=currency,
        lines=lines,
        customer_email=email,
        client_reference=reference,
    ).order_id


def pay_and_ship(ledger: OrderLedger, order_id: UUID) -> None:
    """Capture the whole balance and ship the order."""
    order = ledger.get_order(order_id)
    ledger.capture_payment(order_id, amount=order.total, payment_reference=f"pay-{order_id}")
    ledger.ship_order(order_id, carrier="DHL", tracking_number="TRACK-42")
