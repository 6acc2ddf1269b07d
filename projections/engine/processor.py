"""A processor advances one generation of one projection, one transaction per batch."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from domain.eventstore import START, Checkpoint
from projections.base import EventHandlingError, Projection
from projections.engine.catalog import BUILDING, SERVING, Catalog, Lease, LeaseLostError
from projections.engine.database import BATCH_WRITE, write_transaction
from projections.engine.source import EventBatch, EventSource, SharedReads

log = logging.getLogger("orderledger.projections")

# Worth retrying as they are (a busy or lost database), never blamed on an event.
TRANSIENT_ERRORS = (OperationalError, InterfaceError, DisconnectionError)


@dataclass(frozen=True)
class ProcessorSettings:
    """How a processor reads and holds its lease."""

    batch_size: int = 1000
    lease_ttl: float = 10.0
    read_ahead: bool | None = None
    """While a full batch commits, read the next one in a background thread. None: only where
    reading waits on a database server (PostgreSQL). On SQLite both threads mostly need the
    interpreter lock, and reading ahead made catch-up slower (49-53k -> 40-42k events/s)."""


class Outcome(Enum):
    """What one step did."""

    APPLIED = "applied"
    IDLE = "idle"
    BUSY_ELSEWHERE = "busy_elsewhere"
    LOST = "lost"
    FAILED = "failed"
    PROMOTED = "promoted"
    FINISHED = "finished"


@dataclass(frozen=True)
class StepResult:
    outcome: Outcome
    events: int = 0
    checkpoint: Checkpoint = START
    head: Checkpoint = START

    @property
    def behind(self) -> bool:
        return self.checkpoint < self.head


class Processor:
    """Applies events to one generation's tables, exactly once per event."""

    def __init__(
        self,
        catalog: Catalog,
        source: EventSource,
        projection: Projection,
        generation: int,
        owner: str,
        settings: ProcessorSettings | None = None,
    ) -> None:
        self.catalog = catalog
        self.source = source
        self.projection = projection
        self.generation = generation
        self.owner = owner
        self.settings = settings or ProcessorSettings()
        self.tables = catalog.tables(projection.name, generation)
        self.lease: Lease | None = None
        self.checkpoint = START
        self.role = SERVING
        self.failed = False
        self.finished = False
        self._isolate_until = START
        self._refused_at = -float("inf")
        self._ahead: _ReadAhead | None = None
        self._read_ahead = (
            source.server_side if self.settings.read_ahead is None else self.settings.read_ahead
        )

    # One return per outcome reads best.
    def step(self, reads: SharedReads | None = None) -> StepResult:  # noqa: PLR0911
        """Read one batch after our position and commit it with the new position.

        ``reads``: the worker's reads shared with its other projections this round.
        """
        if self.finished or self.failed:
            return StepResult(Outcome.FINISHED if self.finished else Outcome.FAILED)
        if self.lease is None and not self._try_acquire():
            return StepResult(Outcome.FINISHED if self.finished else Outcome.BUSY_ELSEWHERE)
        assert self.lease is not None
        # After a batch failed outside any one handler, go one event at a time to find the culprit.
        limit = 1 if self.checkpoint < self._isolate_until else self.settings.batch_size
        batch = self._read(limit, reads)
        if batch.checkpoint == self.checkpoint and not (
            self.role == BUILDING and batch.reached_head
        ):
            return StepResult(Outcome.IDLE, checkpoint=self.checkpoint, head=batch.head)
        if self._read_ahead and limit > 1 and len(batch.events) == limit:
            # Catching up: read the next batch while this one commits (while either waits on
            # the database server, the other thread runs). It is used only if this commit
            # moves the position to where that read started.
            self._ahead = _ReadAhead(self.source, batch.checkpoint, limit, self.projection.topics)
        try:
            promoted = self._commit(self.lease, batch)
        except EventHandlingError as error:
            self._fail(self.lease, batch, error)
            return StepResult(Outcome.FAILED, checkpoint=self.checkpoint, head=batch.head)
        except LeaseLostError as error:
            log.warning(
                "lease lost projection=%s generation=%s: %s",
                self.projection.name,
                self.generation,
                error,
            )
            self.lease = None
            return StepResult(Outcome.LOST, checkpoint=self.checkpoint, head=batch.head)
        except TRANSIENT_ERRORS:
            raise
        except Exception as error:
            # load() or flush() failed: no single event is to blame yet.
            if len(batch.events) > 1:
                self._isolate_until = batch.checkpoint
                return StepResult(Outcome.IDLE, checkpoint=self.checkpoint, head=batch.head)
            if not batch.events:
                raise
            self._fail(self.lease, batch, EventHandlingError(0, batch.events[0], error))
            return StepResult(Outcome.FAILED, checkpoint=self.checkpoint, head=batch.head)
        applied = len(batch.events)
        self.checkpoint = batch.checkpoint
        if promoted:
            self.role = SERVING
            dropped = self.catalog.drop_retired(self.projection.name)
            log.info(
                "rebuilt generation took over projection=%s generation=%s position=%s",
                self.projection.name,
                self.generation,
                self.checkpoint.position,
                extra={
                    "projection": self.projection.name,
                    "generation": self.generation,
                    "position": self.checkpoint.position,
                    "retired_generations_dropped": dropped,
                },
            )
            return StepResult(Outcome.PROMOTED, applied, self.checkpoint, batch.head)
        return StepResult(Outcome.APPLIED, applied, self.checkpoint, batch.head)

    def heartbeat(self) -> None:
        """Keep the lease while idle (or while stopped on an error, so nobody loops on it)."""
        if self.lease is not None and not self.catalog.heartbeat(
            self.lease, self.settings.lease_ttl
        ):
            self.lease = None

    def release(self) -> None:
        if self._ahead is not None:
            self._ahead.discard()
            self._ahead = None
        if self.lease is not None:
            self.catalog.release(self.lease)
            self.lease = None

    def _read(self, limit: int, reads: SharedReads | None) -> EventBatch:
        """The batch after our checkpoint: the one read ahead if it starts there, else read now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            batch = ahead.result(self.checkpoint, limit)
            if batch is not None:
                return batch
        if reads is not None and limit == self.settings.batch_size:
            return reads.read(self.checkpoint, limit, self.projection.topics)
        return self.source.read(self.checkpoint, limit, self.projection.topics)

    def _try_acquire(self) -> bool:
        # Someone else's lease lasts lease_ttl: asking far more often only contends for the
        # write lock (SQLite has one for the whole file).
        now = time.monotonic()
        if now - self._refused_at < self.settings.lease_ttl / 5:
            return False
        acquired = self._acquire()
        if not acquired:
            self._refused_at = now
        return acquired

    def _acquire(self) -> bool:
        lease = self.catalog.acquire(
            self.projection.name, self.generation, self.owner, self.settings.lease_ttl
        )
        row = self.catalog.row(self.projection.name, self.generation)
        if row is None or row.role not in (SERVING, BUILDING):
            self.finished = True
            return False
        if lease is None:
            return False
        self.lease = lease
        self.checkpoint = row.checkpoint
        self.role = row.role
        return True

    def _commit(self, lease: Lease, batch: EventBatch) -> bool:
        engine = self.catalog.engine
        with write_transaction(engine, BATCH_WRITE) as conn:
            # Compare-and-set first: a fenced or overtaken processor touches no read-model row,
            # and on PostgreSQL the tracking row stays locked by us until we commit.
            self.catalog.advance(
                conn, lease, self.checkpoint, batch.checkpoint, self.settings.lease_ttl
            )
            self.projection.apply(conn, self.tables, batch.events)
            if self.role == BUILDING and batch.reached_head:
                return self.catalog.promote(conn, lease, batch.checkpoint)
        return False

    def _fail(self, lease: Lease, batch: EventBatch, error: EventHandlingError) -> None:
        """Commit the events before the failing one, then stop there and record why."""
        failing = error.recorded
        before = batch.events[: error.index]
        # Just before the failing event in read order.
        stop_at = max(self.checkpoint, Checkpoint(failing.tx, failing.position - 1))
        try:
            engine = self.catalog.engine
            with write_transaction(engine, BATCH_WRITE) as conn:
                # Also when nothing moves: a fenced processor must not stop the projection.
                self.catalog.advance(conn, lease, self.checkpoint, stop_at, self.settings.lease_ttl)
                self.projection.apply(conn, self.tables, before)
            self.checkpoint = stop_at
        except LeaseLostError:
            self.lease = None
            return
        message = str(error)
        self.catalog.record_error(
            lease,
            position=failing.position,
            event_id=f"{failing.event.originator_id}:{failing.event.originator_version}",
            event_type=failing.type_name,
            message=message,
        )
        self.failed = True
        log.error(
            "projection stopped on a failing event projection=%s position=%s type=%s: %s",
            self.projection.name,
            failing.position,
            failing.type_name,
            message,
            extra={
                "projection": self.projection.name,
                "generation": self.generation,
                "position": failing.position,
                "event_type": failing.type_name,
                "error": message,
            },
            exc_info=error.cause,
        )


class _ReadAhead:
    """One batch read in a background thread, for the step after the current commit."""

    def __init__(
        self, source: EventSource, after: Checkpoint, limit: int, topics: Sequence[str]
    ) -> None:
        self.after = after
        self.limit = limit
        self._batch: EventBatch | None = None
        self._thread = threading.Thread(
            target=self._read,
            args=(source, topics),
            name="orderledger-read-ahead",
            daemon=True,
        )
        self._thread.start()

    def _read(self, source: EventSource, topics: Sequence[str]) -> None:
        try:
            self._batch = source.read(self.after, self.limit, topics)
        except Exception:  # the step reads again itself and meets the error there
            log.debug("reading ahead failed; the next step reads again", exc_info=True)

    def result(self, after: Checkpoint, limit: int) -> EventBatch | None:
        """The batch, if it was read from ``after`` with ``limit`` and without an error."""
        self._thread.join()
        if after != self.after or limit != self.limit:
            return None
        return self._batch

    def discard(self) -> None:
        self._thread.join()
