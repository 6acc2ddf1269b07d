"""How each projection is doing: position, head, lag, state, last error and rebuild progress."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select

from projections.engine.catalog import BUILDING, RETIRED, SERVING, Catalog, Generation
from projections.engine.source import EventSource

LIVE = "live"
CATCHING_UP = "catching_up"
REBUILDING = "rebuilding"
FAILED = "failed"
STALLED = "stalled"
NOT_STARTED = "not_started"
REFUSED = "refused"


@dataclass(frozen=True)
class ProjectionError:
    """Why a generation stopped."""

    position: int
    event_id: str | None
    event_type: str | None
    message: str | None
    at: datetime | None


@dataclass(frozen=True)
class RebuildProgress:
    """A generation being built from event zero while the serving one keeps serving."""

    generation: int
    version: int
    position: int
    head: int
    started_at: datetime
    failed: bool
    error: ProjectionError | None

    @property
    def fraction(self) -> float:
        return 1.0 if self.head <= 0 else min(1.0, self.position / self.head)


@dataclass(frozen=True)
class ProjectionStatus:
    """One projection, as an operator sees it."""

    name: str
    version: int
    serving_generation: int | None
    serving_version: int | None
    position: int
    head: int
    lag_events: int
    lag_seconds: float
    state: str
    last_error: ProjectionError | None
    lease_owner: str | None
    updated_at: datetime | None
    rebuild: RebuildProgress | None
    pending_drops: list[int]
    """Retired generations whose tables a reader still holds; dropped on a later pass."""
    refused: str | None
    """Why this version of the code leaves the projection alone (the store holds a newer one)."""
    oldest_transaction_seconds: float = 0.0
    """Age of the oldest transaction still running (PostgreSQL): events recorded after it
    began wait for it to end."""


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)


def _error(row: Generation) -> ProjectionError | None:
    if row.error_position is None:
        return None
    return ProjectionError(
        position=row.error_position,
        event_id=row.error_event_id,
        event_type=row.error_event_type,
        message=row.error_message,
        at=_time(row.error_at),
    )


def projection_status(
    catalog: Catalog,
    source: EventSource,
    name: str,
    *,
    stalled_after: float = 30.0,
    live_lag_seconds: float = 2.0,
    oldest_transaction: float | None = None,
) -> ProjectionStatus:
    """The status of one projection, read from the tracking table and the store.

    ``oldest_transaction``: the store's oldest transaction age, if already read."""
    projection = catalog.projections[name]
    rows = catalog.rows(name)
    head = source.head()
    held = source.oldest_transaction_age() if oldest_transaction is None else oldest_transaction
    with catalog.engine.connect() as conn:
        now = float(conn.execute(select(catalog.now)).scalar_one())
    serving = next((r for r in rows if r.role == SERVING), None)
    building = next((r for r in rows if r.role == BUILDING), None)
    pending_drops = [r.generation for r in rows if r.role == RETIRED]
    refused = catalog.refusal(name, rows)
    rebuild = None
    if building is not None:
        rebuild = RebuildProgress(
            generation=building.generation,
            version=building.version,
            position=building.position,
            head=head,
            started_at=datetime.fromtimestamp(building.created_at, tz=UTC),
            failed=building.failed,
            error=_error(building),
        )
    if serving is None:
        return ProjectionStatus(
            name=name,
            version=projection.version,
            serving_generation=None,
            serving_version=None,
            position=0,
            head=head,
            lag_events=head,
            lag_seconds=0.0,
            state=NOT_STARTED,
            last_error=None,
            lease_owner=None,
            updated_at=None,
            rebuild=rebuild,
            pending_drops=pending_drops,
            refused=refused,
            oldest_transaction_seconds=round(held, 3),
        )
    lag_events = max(0, head - serving.position)
    oldest = source.timestamp_after(serving.checkpoint) if lag_events else None
    lag_seconds = max(0.0, now - oldest) if oldest is not None else 0.0
    error = _error(serving)
    if refused is not None:
        state = REFUSED
    elif error is not None:
        state = FAILED
    elif rebuild is not None and not rebuild.failed:
        state = REBUILDING
    elif lag_events and now - max(serving.progressed_at, oldest or 0.0) > stalled_after:
        state = STALLED
    elif lag_events and lag_seconds > live_lag_seconds:
        state = CATCHING_UP
    else:
        state = LIVE
    return ProjectionStatus(
        name=name,
        version=projection.version,
        serving_generation=serving.generation,
        serving_version=serving.version,
        position=serving.position,
        head=head,
        lag_events=lag_events,
        lag_seconds=round(lag_seconds, 3),
        state=state,
        last_error=error,
        lease_owner=serving.lease_owner,
        updated_at=_time(serving.updated_at),
        rebuild=rebuild,
        pending_drops=pending_drops,
        refused=refused,
        oldest_transaction_seconds=round(held, 3),
    )


def all_statuses(catalog: Catalog, source: EventSource, **kwargs: float) -> list[ProjectionStatus]:
    """The status of every registered projection."""
    held = source.oldest_transaction_age()
    return [
        projection_status(catalog, source, name, oldest_transaction=held, **kwargs)
        for name in catalog.projections
    ]
