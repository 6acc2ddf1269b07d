"""Every router the app serves, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from api.routes import customers, health, order_queries, orders, projections, reports

routers: tuple[APIRouter, ...] = (
    health.router,
    orders.router,
    order_queries.router,
    projections.router,
    customers.router,
    reports.router,
)
