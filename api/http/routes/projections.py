"""Projection status and rebuilds."""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.http.idempotency import IdempotentRoute
from api.http.problems import problem_responses, response_headers
from api.http.read_models import ProjectionsDep
from api.http.schemas.reads import ProjectionPublic, ProjectionsPublic, RebuildAccepted
from projections.engine.catalog import NewerVersionError
from projections.engine.runtime import ProjectionRuntime, UnknownProjectionError
from projections.engine.status import ProjectionStatus, all_statuses, projection_status

router = APIRouter(
    prefix="/projections",
    tags=["projections"],
    responses=problem_responses(404, 422),
    route_class=IdempotentRoute,
)

ProjectionName = Annotated[str, Path(min_length=1, max_length=64)]


def _public(status: ProjectionStatus) -> ProjectionPublic:
    data = asdict(status)
    if status.rebuild is not None:
        data["rebuild"]["fraction"] = round(status.rebuild.fraction, 4)
    return ProjectionPublic.model_validate(data)


def _known(runtime: ProjectionRuntime, name: str) -> str:
    try:
        return runtime.projection(name).name
    except UnknownProjectionError as error:
        raise HTTPException(status_code=404, detail=str(error)) from None


def current_statuses(runtime: ProjectionRuntime, request: Request) -> list[ProjectionStatus]:
    """Every projection's status, stalled after the app's configured time."""
    stalled_after = request.app.state.settings.projection_stalled_after
    return all_statuses(runtime.catalog, runtime.source, stalled_after=stalled_after)


@router.get("")
def read_projections(runtime: ProjectionsDep, request: Request) -> ProjectionsPublic:
    """Every projection's position, head, lag, state and last error."""
    return ProjectionsPublic(data=[_public(s) for s in current_statuses(runtime, request)])


@router.get("/{name}")
def read_projection(
    name: ProjectionName, runtime: ProjectionsDep, request: Request
) -> ProjectionPublic:
    """One projection's position, head, lag, state, last error and rebuild progress."""
    stalled_after = request.app.state.settings.projection_stalled_after
    status = projection_status(
        runtime.catalog, runtime.source, _known(runtime, name), stalled_after=stalled_after
    )
    return _public(status)


@router.post("/{name}/rebuild", status_code=202, responses={202: response_headers("Location")})
async def rebuild_projection(
    name: ProjectionName,
    runtime: ProjectionsDep,
    request: Request,
    response: Response,
    restart: Annotated[
        bool, Query(description="Discard a rebuild in progress and start over.")
    ] = False,
) -> RebuildAccepted:
    """Start rebuilding from event zero in the background; the current tables keep serving."""
    known = _known(runtime, name)
    try:
        generation = await run_in_threadpool(partial(runtime.start_rebuild, known, restart=restart))
    except NewerVersionError as error:
        raise HTTPException(status_code=409, detail=str(error)) from None
    status_url = str(request.url_for("read_projection", name=known).path)
    response.headers["Location"] = status_url
    return RebuildAccepted(name=known, generation=generation.generation, status_url=status_url)
