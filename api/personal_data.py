"""Right of access and erasure: everything held about a customer, and erasing it.

The HTTP routes and ``orderledger customers`` both call these functions.
"""

from __future__ import annotations

from functools import partial
from typing import Any
from uuid import UUID

from domain.ledger import OrderLedger
from domain.order import PERSONAL_FIELDS
from projections.engine.runtime import ProjectionRuntime
from projections.order_summaries import list_order_summaries

_PAGE = 200
_FIELDS = sorted({field for fields in PERSONAL_FIELDS.values() for field in fields})


def customer_order_ids(runtime: ProjectionRuntime, customer_id: str) -> list[str]:
    """The customer's orders, newest first, as the order_summaries read model has them."""
    found: list[str] = []
    cursor: str | None = None
    while True:
        page = runtime.read(
            "order_summaries",
            partial(list_order_summaries, customer_id=customer_id, limit=_PAGE, cursor=cursor),
        )
        found += [summary.order_id for summary in page.items]
        if page.next_cursor is None:
            return found
        cursor = page.next_cursor


def export(ledger: OrderLedger, runtime: ProjectionRuntime, customer_id: str) -> dict[str, Any]:
    """Everything held about the customer, decrypted (``[erased]`` once erased), as JSON."""
    orders = []
    for order_id in customer_order_ids(runtime, customer_id):
        order = ledger.get_order(UUID(order_id))
        orders.append(
            {
                "order_id": order_id,
                "placed_at": order.created_on.isoformat(),
                "status": order.status,
                "currency": order.currency,
                "total": order.total,
                "carrier": order.carrier,
                **{field: getattr(order, field, None) for field in _FIELDS},
            }
        )
    personal = ledger.personal
    return {
        "customer_id": customer_id,
        "data_keys": personal is not None and personal.has_keys(customer_id),
        "orders": orders,
    }
