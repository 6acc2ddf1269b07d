"""Rebuild a projection from event zero in the foreground, reporting progress as it goes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from projections.engine.catalog import BUILDING, SERVING, Generation, NewerVersionError
from projections.engine.processor import Outcome, Processor, ProcessorSettings
from projections.engine.runtime import ProjectionRuntime
from projections.engine.worker import worker_id


@dataclass(frozen=True)
class Progress:
    """Where a rebuild stands: positions done out of the head, and whether it took over."""

    name: str
    generation: int
    position: int
    head: int
    events: int
    done: bool


class RebuildFailedError(Exception):
    """A handler failed during the rebuild; the serving generation was left in place."""


def rebuild(
    runtime: ProjectionRuntime,
    name: str,
    *,
    restart: bool = False,
    batch_size: int = 5000,
    on_progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
) -> Generation:
    """Build a new generation of ``name`` up to the head and let it take over.

    Resumes a rebuild a killed process left behind unless ``restart`` is given. If a worker
    elsewhere already holds the building generation, this waits for it and reports its progress.
    """
    projection = runtime.projection(name)
    catalog = runtime.catalog
    catalog.ensure(projection)
    try:
        building = runtime.start_rebuild(name, restart=restart)
    except NewerVersionError as error:
        raise RebuildFailedError(str(error)) from None
    settings = ProcessorSettings(batch_size=batch_size, lease_ttl=runtime.settings.lease_ttl)
    processor = Processor(
        catalog, runtime.source, projection, building.generation, worker_id(), settings
    )
    events = 0
    stop = stop or threading.Event()
    try:
        while not stop.is_set():
            result = processor.step()
            events += result.events
            row = catalog.row(name, building.generation)
            if row is None:
                raise RebuildFailedError(f"generation {building.generation} of {name} vanished")
            done = row.role == SERVING
            if on_progress is not None:
                head = max(result.head.position, runtime.source.head())
                on_progress(Progress(name, row.generation, row.position, head, events, done))
            if done:
                return row
            if result.outcome is Outcome.FAILED or (row.failed and row.role == BUILDING):
                raise RebuildFailedError(
                    f"rebuild of {name} failed at position {row.error_position} "
                    f"({row.error_event_type}): {row.error_message}"
                )
            if result.outcome is Outcome.BUSY_ELSEWHERE:
                stop.wait(0.5)
        raise RebuildFailedError(f"rebuild of {name} was interrupted; run it again to resume")
    finally:
        processor.release()
