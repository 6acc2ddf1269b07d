"""Every router the app serves, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from api.routes import (
    customers,
    effects,
    health,
    order_queries,
    orders,
    projections,
    readiness,
    reports,
    webhooks,
)

routers: tuple[APIRouter, ...] = (
    health.router,
    readiness.router,
    orders.router,
    order_queries.router,
    projections.router,
    customers.router,
    reports.router,
    webhooks.router,
    effects.router,
)
