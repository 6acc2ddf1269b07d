"""Every projection orderledger runs, by name."""

from __future__ import annotations

from projections.audit_log import AuditLogProjection
from projections.base import Projection
from projections.customer_stats import CustomerStatsProjection
from projections.daily_sales import DailySalesProjection
from projections.effects.outbox import OutboxProjection
from projections.order_summaries import OrderSummaryProjection
from projections.sku_sales import SkuSalesProjection


def all_projections() -> list[Projection]:
    """A fresh instance of each projection, in the order workers run them."""
    return [
        OrderSummaryProjection(),
        CustomerStatsProjection(),
        DailySalesProjection(),
        SkuSalesProjection(),
        OutboxProjection(),
        AuditLogProjection(),
    ]
