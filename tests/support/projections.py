"""Helpers for projection tests: a settable event clock, catching up, reading tables."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from projections.engine.catalog import BUILDING
from projections.engine.processor import ProcessorSettings
from projections.engine.runtime import ProjectionRuntime
from projections.engine.worker import Worker


class LedgerClock:
    """The moment every new event is stamped with; it moves only when a test moves it."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


def run_until_caught_up(
    runtime: ProjectionRuntime,
    only: Sequence[str] | None = None,
    *,
    batch_size: int | None = None,
) -> None:
    """Run a worker until every generation is at the head and serving; fail on a stopped one.

    The worker gives its leases back afterwards, so the next worker need not wait them out.
    """
    names = list(only) if only else [p.name for p in runtime.projections]
    settings = runtime.settings
    if batch_size is not None:
        settings = ProcessorSettings(batch_size=batch_size, lease_ttl=settings.lease_ttl)
    worker = Worker(
        runtime.catalog,
        runtime.source,
        [runtime.projection(n) for n in names],
        settings=settings,
        idle_wait=0.05,
    )
    try:
        worker.run_until_caught_up(timeout=120)
    finally:
        for processor in worker.processors.values():
            processor.release()
    for name in names:
        for row in runtime.catalog.rows(name):
            assert not row.failed, (
                f"{name} generation {row.generation} stopped at position {row.error_position} "
                f"({row.error_event_type}): {row.error_message}"
            )
            assert row.role != BUILDING, f"{name} generation {row.generation} is still building"


def table_contents(runtime: ProjectionRuntime, name: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every serving table of a projection, sorted, keyed by base table name."""
    with runtime.reading(name) as (conn, tables):
        return {
            base: sorted((tuple(row) for row in conn.execute(select(table))), key=repr)
            for base, table in sorted(tables.items())
        }


def checksum(contents: dict[str, list[tuple[Any, ...]]]) -> str:
    """A digest of a projection's sorted rows."""
    return hashlib.sha256(repr(sorted(contents.items())).encode()).hexdigest()


def utc(value: datetime) -> datetime:
    """A stored moment as an aware UTC datetime (SQLite returns it without a zone)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
