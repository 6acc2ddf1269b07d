"""The HTTP app: create_app(settings) wires the ledger, the routers and the problem handlers."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from importlib.metadata import version

from fastapi import FastAPI, HTTPException
from fastapi.telemetry import TelemetryConfig
from starlette.datastructures import Headers
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.bootstrap import open_ledger
from api.http import console
from api.http.auth import keys_resource
from api.http.problems import install_problem_handlers
from api.http.read_models import projections_resource
from api.http.routes import access
from api.http.shortcuts import OrderReadShortcut
from api.logs import RequestLogMiddleware, lean_log_records
from api.metrics import metrics_resource
from api.settings import Settings
from domain.ledger import OrderLedger
from projections.engine.runtime import ProjectionRuntime

MAX_BODY_BYTES = 64 * 1024

_NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}

LifespanResource = Callable[[FastAPI], AbstractAsyncContextManager[None]]
"""Something the app holds while it runs: entered at start-up, exited (in reverse) at shutdown."""


def create_app(
    settings: Settings,
    *,
    ledger: OrderLedger | None = None,
    projections: ProjectionRuntime | None = None,
) -> FastAPI:
    """Build the app; it opens the ledger at start-up unless given one (whose owner closes it)."""
    resources: list[LifespanResource] = [
        keys_resource(settings),
        ledger_resource(settings, ledger),
        projections_resource(settings, projections),
        metrics_resource(settings),
    ]
    app = OrderLedgerAPI(
        title="orderledger",
        summary="Event-sourced order ledger: append-only orders with a full audit history.",
        version=version("orderledger"),
        lifespan=_lifespan(resources),
        # Off, FastAPI does not look for configured OpenTelemetry providers on every request
        # (about a tenth of a plain order read).
        telemetry=None if settings.opentelemetry else _NO_TELEMETRY,
    )
    app.state.settings = settings
    lean_log_records()
    # It would bypass OpenTelemetry's middleware: with telemetry on, reads take the route.
    app.order_read = None if settings.opentelemetry else OrderReadShortcut()
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(RequestLogMiddleware)  # outermost: its request id reaches every response
    install_problem_handlers(app)
    for router, roles in access:
        app.include_router(router, **roles.include_options(router))
    # The console signs in with a key and keeps it in a cookie: its pages check roles themselves.
    app.include_router(console.router)
    app.add_exception_handler(console.RefusedError, console.refused_page)  # type: ignore[arg-type]
    app.mount("/console/static", StaticFiles(directory=console.STATIC), name="console-static")
    return app


class OrderLedgerAPI(FastAPI):
    """FastAPI, asking the order read shortcut first (api/http/shortcuts.py)."""

    order_read: OrderReadShortcut | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        shortcut = self.order_read
        if shortcut is not None and shortcut.takes(scope):
            scope["app"] = self  # as Starlette sets it
            if await shortcut.answered(self.state, scope, send):
                return
        await super().__call__(scope, receive, send)


def ledger_resource(settings: Settings, ledger: OrderLedger | None) -> LifespanResource:
    """Put the ledger on app.state for the app's lifetime, opening and closing it if not given."""

    @asynccontextmanager
    async def hold_ledger(app: FastAPI) -> AsyncIterator[None]:
        if ledger is not None:
            app.state.ledger = ledger
            yield
            return
        opened = open_ledger(settings)
        app.state.ledger = opened
        try:
            yield
        finally:
            opened.close()

    return hold_ledger


def _lifespan(
    resources: Sequence[LifespanResource],
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for resource in resources:
                await stack.enter_async_context(resource(app))
            # What start-up built (about 140,000 objects: routes, models, the store's and the
            # engines' machinery) lives as long as the app. Out of the collector's way, a full
            # collection no longer walks it: 30-60 ms during which no request was answered.
            gc.freeze()
            try:
                yield
            finally:
                gc.unfreeze()

    return lifespan


class BodySizeLimitMiddleware:
    """Refuse request bodies over max_bytes, whether declared by Content-Length or streamed.

    The refusal is raised while the route reads its body, so the problem handlers answer it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        too_large = HTTPException(413, detail=f"the request body exceeds {self.max_bytes} bytes")
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited_receive, send)
