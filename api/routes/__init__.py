"""Every router the app serves, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from api.routes import health, orders

routers: tuple[APIRouter, ...] = (health.router, orders.router)
