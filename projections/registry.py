"""Every projection orderledger runs, by name."""

from __future__ import annotations

from projections.base import Projection
from projections.order_summaries import OrderSummaryProjection


def all_projections() -> list[Projection]:
    """A fresh instance of each projection, in the order workers run them."""
    return [OrderSummaryProjection()]
