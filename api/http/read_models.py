"""The projection runtime inside the HTTP app: read models, read-your-writes and the worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, TypeVar, cast

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from sqlalchemy import Connection, Table
from starlette.concurrency import run_in_threadpool

from api.bootstrap import dispatcher_for
from api.cli.webhooks import Reconciler
from api.settings import Settings
from domain.ledger import OrderLedger
from domain.money import MAX_AMOUNT
from projections.effects.service import Effects
from projections.engine.point_read import PointReader
from projections.engine.processor import ProcessorSettings
from projections.engine.runtime import ProjectionRuntime

T = TypeVar("T")


def open_projection_runtime(settings: Settings, ledger: OrderLedger) -> ProjectionRuntime:
    """The projection runtime on the configured read-model database."""
    return ProjectionRuntime.open(
        ledger,
        settings.read_model_url,
        poll_interval=settings.projection_poll_interval,
        settings=ProcessorSettings(
            batch_size=settings.projection_batch_size, lease_ttl=settings.projection_lease_ttl
        ),
    )


def projections_resource(
    settings: Settings, runtime: ProjectionRuntime | None = None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Hold the projection runtime for the app's lifetime; run the worker in the embedded mode."""

    @asynccontextmanager
    async def hold_projections(app: FastAPI) -> AsyncIterator[None]:
        owned = runtime is None
        held = (
            runtime
            if runtime is not None
            else await run_in_threadpool(open_projection_runtime, settings, app.state.ledger)
        )
        app.state.projections = held
        app.state.order_reader = PointReader(
            held.engine, held.catalog, "order_summaries", "order_summaries"
        )
        worker = None
        dispatcher = None
        reconciler = None
        if settings.run_projections:
            worker = held.worker(idle_wait=settings.projection_idle_wait)
            await run_in_threadpool(worker.start)
            if settings.run_effects:
                dispatcher = dispatcher_for(settings, held, app.state.ledger)
                dispatcher.start()
                reconciler = Reconciler(
                    Effects(held.engine, held.source), settings.effect_reconcile_interval
                )
                reconciler.start()
        try:
            yield
        finally:
            if reconciler is not None:
                await run_in_threadpool(reconciler.stop)
            if dispatcher is not None:
                await run_in_threadpool(dispatcher.stop)
            if worker is not None:
                await run_in_threadpool(worker.stop)
            app.state.order_reader.close()
            if owned:
                held.close()

    return hold_projections


def get_projections(request: Request) -> ProjectionRuntime:
    """The projection runtime the app opened at start-up."""
    return cast(ProjectionRuntime, request.app.state.projections)


async def _projections(request: Request) -> ProjectionRuntime:
    return get_projections(request)


ProjectionsDep = Annotated[ProjectionRuntime, Depends(_projections)]


async def min_position(
    min_position: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_AMOUNT,
            description="Wait until the read model has applied this global position "
            "(a command's `position`), or answer 503.",
        ),
    ] = None,
    header: Annotated[
        int | None,
        Header(alias="Orderledger-Min-Position", ge=0, le=MAX_AMOUNT),
    ] = None,
) -> int | None:
    """The position a read must reflect, from the query string or the header."""
    values = [value for value in (min_position, header) if value is not None]
    return max(values) if values else None


MinPositionDep = Annotated[int | None, Depends(min_position)]


async def wait_for_position(
    runtime: ProjectionRuntime, settings: Settings, name: str, position: int | None
) -> None:
    """Read-your-writes: wait (bounded) until projection ``name`` has applied ``position``."""
    if position is None:
        return
    deadline = time.monotonic() + settings.read_your_writes_timeout
    while True:
        serving = await run_in_threadpool(runtime.catalog.serving, name)
        if serving is not None and serving.position >= position:
            return
        if time.monotonic() >= deadline:
            reached = serving.position if serving is not None else 0
            raise HTTPException(
                status_code=503,
                detail=f"the {name} read model has reached position {reached}, not yet "
                f"{position}; retry shortly",
                headers={"Retry-After": "1"},
            )
        await asyncio.sleep(0.01)


async def read_model(
    request: Request,
    name: str,
    query: Callable[[Connection, dict[str, Table]], T],
    min_position: int | None,
) -> T:
    """Run a query on read model ``name`` once it has applied ``min_position``."""
    runtime = get_projections(request)
    await wait_for_position(runtime, request.app.state.settings, name, min_position)
    try:
        return await run_in_threadpool(runtime.read, name, query)
    except LookupError:
        if await run_in_threadpool(runtime.catalog.serving, name) is not None:
            raise
        # No worker has created the read model yet (one is not run in this process).
        raise HTTPException(
            status_code=503,
            detail=f"the {name} read model has not been built yet; retry shortly",
            headers={"Retry-After": "1"},
        ) from None
