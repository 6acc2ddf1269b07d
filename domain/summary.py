"""Pure rules deriving an order's status and dues from its figures (shared with read models)."""

from __future__ import annotations


class OrderStatus:
    """The statuses an order moves through (strings, so they read the same everywhere)."""

    PENDING_PAYMENT = "pending_payment"
    PARTIALLY_PAID = "partially_paid"
    PAID = "paid"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"

    ALL = (PENDING_PAYMENT, PARTIALLY_PAID, PAID, SHIPPED, DELIVERED, CANCELLED)


def order_status(
    *, total: int, captured: int, shipped: bool, delivered: bool, cancelled: bool
) -> str:
    """The status an order with these figures is in."""
    if cancelled:
        return OrderStatus.CANCELLED
    if delivered:
        return OrderStatus.DELIVERED
    if shipped:
        return OrderStatus.SHIPPED
    if captured >= total:
        return OrderStatus.PAID
    if captured > 0:
        return OrderStatus.PARTIALLY_PAID
    return OrderStatus.PENDING_PAYMENT


def balance_due(*, total: int, captured: int, cancelled: bool) -> int:
    """What the customer still owes (nothing once cancelled)."""
    return 0 if cancelled else total - captured


def refund_due(*, captured: int, refunded: int, cancelled: bool) -> int:
    """What a cancelled order still owes the customer back."""
    return captured - refunded if cancelled else 0
