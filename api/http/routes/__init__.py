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

routers: tuple[APIRouter, ...] = (
    # The busiest first: a request is matched against the routes in this order.
    order_queries.router,
    orders.router,
    orders.history_router,
    health.router,
    readiness.router,
    projections.router,
    personal_data.router,  # before customers: its ids may hold a slash
    customers.router,
    reports.router,
    audit.router,
    webhooks.router,
    effects.router,
    keys.router,
    metrics.router,
)

access: tuple[tuple[APIRouter, Access], ...] = (
    (health.router, OPEN),
    (readiness.router, OPEN),
    (orders.router, LEDGER),
    (orders.history_router, LEDGER),
    (order_queries.router, LEDGER),
    (projections.router, OPERATIONS),
    (personal_data.router, PERSONAL),
    (customers.router, LEDGER),
    (reports.router, LEDGER),
    (audit.router, AUDIT),
    (webhooks.router, ADMIN),
    (effects.router, ADMIN),
    (keys.router, ADMIN),
    (metrics.router, OPEN),  # guarded by its own metrics_guard (settings.metrics_public)
)
"""The roles each router needs (see api/http/auth.py); every router must have an entry."""


def _name_operations(groups: tuple[APIRouter, ...]) -> None:
    """OpenAPI operation ids are the route functions' names: readable, and unique by design."""
    for router in groups:
        for route in router.routes:
            if isinstance(route, APIRoute) and route.operation_id is None:
                route.operation_id = route.name


_name_operations(routers)
