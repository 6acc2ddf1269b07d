"""Every router the app serves, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from api.routes import health, order_queries, orders, projections

routers: tuple[APIRouter, ...] = (
    health.router,
    orders.router,
    order_queries.router,
    projections.router,
)
