"""The audit log, its checkpoints and verify: for auditors (and admins)."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import AfterValidator, AwareDatetime
from starlette.concurrency import run_in_threadpool

from api.http.dependencies import ReachableMinPositionDep
from api.http.idempotency import IdempotentRoute
from api.http.problems import problem_responses
from api.http.read_models import ProjectionsDep, read_model
from api.http.schemas.reads import (
    AuditEntriesPublic,
    AuditEntryPublic,
    CheckpointPublic,
    CheckpointsPublic,
    VerifyReportPublic,
    VerifyRequest,
)
from domain.errors import OrderNotFoundError
from projections.audit_log import (
    NAME,
    AuditEntry,
    AuditFilters,
    Checkpoint,
    InvalidCheckpointError,
    decode_cursor,
    list_audit_entries,
    list_checkpoints,
    request_checkpoint,
)
from projections.engine.runtime import ProjectionRuntime
from projections.verify import VerifyReport, verify_order, verify_store

router = APIRouter(
    prefix="/audit",
    tags=["audit"],
    responses=problem_responses(422, 503),
    route_class=IdempotentRoute,
)

MAX_PAGE = 500


def _printable(value: str) -> str:
    """Refuse what no recorded id holds (PostgreSQL also refuses NUL in text)."""
    if not value or not value.isprintable():
        raise ValueError("must be 1 to 200 printable characters")
    return value


def _issued_cursor(cursor: str) -> str:
    decode_cursor(cursor)
    return cursor


SearchText = Annotated[str, Query(max_length=200), AfterValidator(_printable)]


def _utc(moment: datetime) -> datetime:
    """The same instant in UTC, as the log stores it (SQLite compares the text)."""
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("the moment is out of range once in UTC") from None


Moment = Annotated[AwareDatetime, AfterValidator(_utc)]


def public_entry(entry: AuditEntry) -> AuditEntryPublic:
    return AuditEntryPublic(
        position=entry.position,
        order_id=entry.order_id,
        version=entry.version,
        event_type=entry.event_type,
        recorded_at=entry.recorded_at,
        event_id=entry.event_id,
        actor={
            "kind": entry.actor_kind,
            "id": entry.actor_id,
            "name": entry.actor_name,
            "role": entry.actor_role,
        },
        request_id=entry.request_id,
        correlation_id=entry.correlation_id,
        causation_id=entry.causation_id,
        chain_hash=entry.chain_hash.hex() if entry.chain_hash is not None else None,
    )


@router.get("")
async def read_audit_log(
    request: Request,
    min_position: ReachableMinPositionDep,
    actor: Annotated[
        SearchText | None, Query(description="The actor's id: an API key id, or the OS user.")
    ] = None,
    order_id: Annotated[SearchText | None, Query(description="An order's id.")] = None,
    event_type: Annotated[SearchText | None, Query(examples=["PaymentCaptured"])] = None,
    correlation_id: SearchText | None = None,
    recorded_from: Annotated[
        Moment | None, Query(alias="from", description="Recorded at or after (ISO 8601).")
    ] = None,
    recorded_to: Annotated[
        Moment | None, Query(alias="to", description="Recorded before (ISO 8601).")
    ] = None,
    order: Annotated[Literal["desc", "asc"], Query(description="By position.")] = "desc",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=64), AfterValidator(_issued_cursor)] = None,
) -> AuditEntriesPublic:
    """Who recorded which event, on whose request: filtered, newest first, keyset-paged."""
    filters = AuditFilters(
        actor=actor,
        order_id=order_id,
        event_type=event_type,
        correlation_id=correlation_id,
        recorded_from=recorded_from,
        recorded_to=recorded_to,
    )
    query = partial(list_audit_entries, filters=filters, limit=limit, cursor=cursor, order=order)
    page = await read_model(request, NAME, query, min_position)
    next_link = None
    if page.next_cursor is not None:
        next_link = str(request.url.include_query_params(cursor=page.next_cursor))
    return AuditEntriesPublic(
        data=[public_entry(e) for e in page.items], next_cursor=page.next_cursor, next=next_link
    )


def public_checkpoint(checkpoint: Checkpoint) -> CheckpointPublic:
    return CheckpointPublic.model_validate(checkpoint.document())


def _checkpoints(runtime: ProjectionRuntime) -> list[Checkpoint]:
    with runtime.engine.connect() as conn:
        return list_checkpoints(conn)


@router.get("/checkpoints")
async def read_checkpoints(runtime: ProjectionsDep) -> CheckpointsPublic:
    """Every checkpoint the audit log recorded: keep copies outside the store."""
    found = await run_in_threadpool(_checkpoints, runtime)
    return CheckpointsPublic(data=[public_checkpoint(c) for c in found])


@router.post("/checkpoints", status_code=201, responses=problem_responses(409))
async def take_checkpoint(runtime: ProjectionsDep) -> CheckpointPublic:
    """Record the digest of every event the audit log has seen, now, and hand it out."""
    try:
        taken = await run_in_threadpool(
            request_checkpoint, runtime.engine, runtime.catalog.serving_tables
        )
    except LookupError:
        raise HTTPException(
            503,
            detail="the audit_log read model has not been built yet; retry shortly",
            headers={"Retry-After": "1"},
        ) from None
    if taken is None:
        raise HTTPException(409, detail="the audit log has seen no chained event yet")
    return public_checkpoint(taken)


@router.post("/verify", responses=problem_responses(404, 413, 415))
async def verify(body: VerifyRequest, runtime: ProjectionsDep) -> VerifyReportPublic:
    """Re-read the store and report the first broken link (``ok`` false), if any.

    Checks every event's hash chain, the audit log against the store, and the digest against
    every recorded checkpoint and those given here.
    """
    try:
        given = [Checkpoint.from_document(c.model_dump(mode="json")) for c in body.checkpoints]
    except InvalidCheckpointError as error:
        raise HTTPException(422, detail=str(error)) from None
    if body.order_id is not None and given:
        raise HTTPException(
            422, detail="checkpoints cover the whole store: give them without order_id"
        )
    try:
        report: VerifyReport = await (
            run_in_threadpool(verify_order, runtime, body.order_id)
            if body.order_id is not None
            else run_in_threadpool(verify_store, runtime, given)
        )
    except OrderNotFoundError as error:
        raise HTTPException(404, detail=str(error)) from None
    return VerifyReportPublic.model_validate(report.document())
