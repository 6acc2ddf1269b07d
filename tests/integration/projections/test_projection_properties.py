"""No sequence of commands the ledger accepts can stop a projection."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from typing import Any
from uuid import UUID

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from domain.errors import OrderLedgerError
from domain.ledger import OrderLedger
from domain.money import MAX_AMOUNT
from domain.order import MAX_QUANTITY
from projections.engine.runtime import ProjectionRuntime
from tests.support.projections import run_until_caught_up
from tests.support.stores import open_ledger_at

Command = Callable[[OrderLedger, list[UUID]], Any]

# Extremes first: the largest accepted amounts are where sums would overflow.
amounts = st.one_of(
    st.just(MAX_AMOUNT),
    st.just(MAX_AMOUNT),
    st.sampled_from([MAX_AMOUNT - 1, MAX_AMOUNT // 2, 2, 1]),
    st.integers(1, MAX_AMOUNT),
)
quantities = st.one_of(st.just(1), st.sampled_from([2, MAX_QUANTITY]), st.integers(1, MAX_QUANTITY))
skus = st.sampled_from(["SKU-A", "SKU-B", "SKU-C"])
customers = st.sampled_from(["cust-1", "cust-2"])


def _place(customer: str, sku: str, quantity: int, price: int) -> Command:
    def command(ledger: OrderLedger, orders: list[UUID]) -> Any:
        lines = [{"sku": sku, "quantity": quantity, "unit_price": price}]
        placed = ledger.place_order(customer_id=customer, currency="EUR", lines=lines)
        orders.append(placed.order_id)

    return command


def _on_order(pick: int, name: str, kwargs: dict[str, Any]) -> Command:
    """Run the ledger's method ``name`` on one of the orders placed so far."""

    def command(ledger: OrderLedger, orders: list[UUID]) -> Any:
        if not orders:
            return None
        order_id = orders[pick % len(orders)]
        if name == "capture_payment" and kwargs["amount"] is None:
            due = ledger.get_order(order_id).balance_due
            return ledger.capture_payment(order_id, amount=due, payment_reference=f"full-{due}")
        return getattr(ledger, name)(order_id, **kwargs)

    return command


def _on(name: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Command]:
    return st.builds(_on_order, st.integers(0, 7), st.just(name), st.fixed_dictionaries(fields))


placements = st.builds(_place, customers, skus, quantities, amounts)
commands: st.SearchStrategy[Command] = st.one_of(
    placements,
    placements,
    placements,
    _on("add_line", sku=skus, quantity=quantities, unit_price=amounts),
    _on("remove_line", sku=skus),
    _on("capture_payment", amount=st.none(), payment_reference=st.just("")),
    _on("capture_payment", amount=amounts, payment_reference=st.sampled_from(["p-1", "p-2"])),
    _on("issue_refund", amount=amounts, reason=st.just("returned")),
    _on("cancel_order", reason=st.just("changed mind")),
    _on("ship_order", carrier=st.just("DHL"), tracking_number=st.just("T1")),
    _on("deliver_order"),
)


class TestAcceptedCommandsNeverStopAProjection:
    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(commands, min_size=1, max_size=40))
    @example(
        # The largest orders of one customer, day and SKU, paid in full: the biggest sums.
        [_place("cust-1", "SKU-A", 1, MAX_AMOUNT)] * 3
        + [_on_order(pick, "capture_payment", {"amount": None}) for pick in range(3)]
    )
    def test_every_projection_applies_whatever_the_ledger_accepted(
        self, program: list[Command]
    ) -> None:
        """Commands the ledger refuses record nothing; every projection applies the rest."""
        with tempfile.TemporaryDirectory() as directory:
            url = f"sqlite:///{directory}/orderledger.db"
            ledger = open_ledger_at(url)
            runtime = ProjectionRuntime.open(ledger, url, poll_interval=0.02)
            try:
                orders: list[UUID] = []
                for command in program:
                    with contextlib.suppress(OrderLedgerError):
                        command(ledger, orders)
                run_until_caught_up(runtime)
            finally:
                runtime.close()
                ledger.close()
