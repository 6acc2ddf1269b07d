"""Every router the app serves, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.routing import APIRoute

from api.http.auth import ADMIN, AUDIT, LEDGER, OPEN, OPERATIONS, PERSONAL, Access
from api.http.routes import (
    audit,
    customers,
    effects,
    health,
    keys,
    metrics,
    order_queries,
    orders,
    personal_data,
    projections,
    readiness,
    reports,
    webhooks,
)

access: tuple[tuple[APIRouter, Access], ...] = (
    # The busiest first: a request is matched against the routes in this order.
    (order_queries.router, LEDGER),
    (orders.router, LEDGER),
    (orders.history_router, LEDGER),
    (health.router, OPEN),
    (readiness.router, OPEN),
    (projections.router, OPERATIONS),
    (personal_data.router, PERSONAL),  # before customers: its ids may hold a slash
    (customers.router, LEDGER),
    (reports.router, LEDGER),
    (audit.router, AUDIT),
    (webhooks.router, ADMIN),
    (effects.router, ADMIN),
    (keys.router, ADMIN),
    (metrics.router, OPEN),  # guarded by its own metrics_guard (settings.metrics_public)
)
"""Every router the app serves, with the roles it needs (see api/http/auth.py): a router is
served only with the roles decided here, so none can be left open by mistake."""


def _name_operations(groups: tuple[APIRouter, ...]) -> None:
    """OpenAPI operation ids are the route functions' names: readable, and unique by design."""
    for router in groups:
        for route in router.routes:
            if isinstance(route, APIRoute) and route.operation_id is None:
                route.operation_id = route.name


_name_operations(tuple(router for router, _ in access))
