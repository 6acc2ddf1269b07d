"""The worker: keeps every generation of its projections moving, in one thread."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence

from domain.eventstore import Checkpoint
from projections.base import Projection
from projections.engine.background import LoopThread
from projections.engine.catalog import BUILDING, RETIRED, SERVING, Catalog
from projections.engine.processor import Outcome, Processor, ProcessorSettings
from projections.engine.source import EventSource, SharedReads
from projections.engine.status import projection_status

log = logging.getLogger("orderledger.projections")

DROP_RETRY_SECONDS = 5.0
"""How often a retired generation whose drop timed out (a reader still in it) is tried again."""


def worker_id() -> str:
    """A name unique to this process, readable in the tracking table."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """Runs processors for the serving and building generations of the given projections.

    Catch-up goes as fast as batches commit; once every processor is at the head it waits for
    new events (LISTEN/NOTIFY on PostgreSQL, polling on SQLite) and applies small batches.

    On SQLite a live pass starts at most once per poll interval (``gather``): each pass costs
    a transaction per projection however few its events, and every one of them takes the
    store's one write lock, so passes run back to back behind a steady stream of commands
    made each command wait and cost twice the CPU. Events arriving meanwhile wait for the
    next pass, no longer than a poll would have made them wait.
    """

    def __init__(
        self,
        catalog: Catalog,
        source: EventSource,
        projections: Sequence[Projection],
        *,
        settings: ProcessorSettings | None = None,
        idle_wait: float = 0.5,
        owner: str | None = None,
        gather: float | None = None,
        lag_sample_every: float = 60.0,
    ) -> None:
        self.catalog = catalog
        self.source = source
        self.projections = list(projections)
        self.settings = settings or ProcessorSettings()
        self.idle_wait = idle_wait
        self.gather = (
            (0.0 if source.server_side else source.poll_interval) if gather is None else gather
        )
        """Least seconds from the start of one live pass to the start of the next."""
        self.owner = owner or worker_id()
        self.processors: dict[tuple[str, int], Processor] = {}
        self._background = LoopThread("orderledger-worker")
        self._stop = self._background.stopping
        self._last_refresh = 0.0
        self._last_heartbeat = 0.0
        self._last_drop: dict[str, float] = {}
        self.lag_sample_every = lag_sample_every
        """How often to record the lag of each serving generation this worker holds."""
        self._last_lag_sample = -float("inf")

    # -- running -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the tracking table and every projection's serving generation."""
        self.catalog.install()
        for projection in self.projections:
            self.catalog.ensure(projection)
            # Tables a killed process left behind after a takeover, before dropping them.
            self.catalog.drop_retired(projection.name)

    def start(self) -> None:
        """Run in a background thread (the embedded mode inside ``orderledger serve``)."""
        self.prepare()
        self._background.start(self.run)

    def stop(self, timeout: float = 10.0) -> None:
        self._background.stop(timeout)

    def run(self) -> None:
        """Loop until stopped; a failing database is retried, never fatal."""
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    busy = self.run_once()
                except Exception:
                    log.exception("projection worker iteration failed; retrying")
                    self._stop.wait(1.0)
                    continue
                if not busy:
                    self.source.wait_for_events(
                        self._lowest_checkpoint(), self.idle_wait, self._stop
                    )
                    rest = started + self.gather - time.monotonic()
                    if rest > 0:
                        self._stop.wait(rest)
        finally:
            self.release_all()

    def run_once(self) -> bool:
        """One batch for each processor; True if any of them has more to do right away."""
        now = time.monotonic()
        if now - self._last_refresh > 1.0:
            self.refresh()
            self._last_refresh = now
        busy = False
        reads = SharedReads(self.source, [p.topics for p in self.projections])
        for key, processor in list(self.processors.items()):
            result = processor.step(reads)
            if result.outcome in (Outcome.APPLIED, Outcome.PROMOTED):
                busy = busy or result.behind or result.outcome is Outcome.PROMOTED
            if result.outcome is Outcome.FINISHED:
                del self.processors[key]
            if result.outcome is Outcome.PROMOTED:
                self.refresh()
        if now - self._last_heartbeat > self.settings.lease_ttl / 3:
            for processor in self.processors.values():
                processor.heartbeat()
            self._last_heartbeat = now
        if now - self._last_lag_sample >= self.lag_sample_every:
            self._last_lag_sample = now
            self._sample_lag()
        return busy

    def _sample_lag(self) -> None:
        """Record the lag of each serving generation this worker holds (for the console)."""
        for processor in list(self.processors.values()):
            if processor.lease is None or processor.role != SERVING:
                continue
            name = processor.projection.name
            try:
                status = projection_status(self.catalog, self.source, name)
                self.catalog.record_lag(name, time.time(), status.lag_events, status.lag_seconds)
            except Exception:  # a chart's sample is never worth stopping for
                log.warning("could not record the lag of projection=%s", name, exc_info=True)

    def run_until_caught_up(self, timeout: float = 300.0) -> None:
        """Process until every generation this worker can hold is at the head (for tests, CLI)."""
        self.prepare()
        try:
            self._run_until_caught_up(time.monotonic() + timeout)
        finally:
            self.release_all()

    def _run_until_caught_up(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            # While busy, run_once looks for new generations every second; before deciding
            # that everything is caught up, look now (and step any that appeared).
            if self.run_once() or self.refresh():
                continue
            head = self.source.last_committed()
            rows = [
                row
                for projection in self.projections
                for row in self.catalog.rows(projection.name)
                if row.role in (SERVING, BUILDING)
                and row.version == projection.version
                and not row.failed
            ]
            # A failed generation stops for good; the others still catch up before the end
            # (a transaction of another session may hold them back for a moment).
            if all(row.checkpoint >= head for row in rows) and (
                all(row.role == SERVING for row in rows)
                or any(p.failed for p in self.processors.values())
            ):
                return
            # Someone else holds a lease, or events arrived meanwhile: do not spin.
            self.source.wait_for_events(self._lowest_checkpoint(), min(self.idle_wait, 0.1))
        raise TimeoutError("projections did not catch up in time")

    def release_all(self) -> None:
        """Give every lease back so another worker can take over at once."""
        for processor in self.processors.values():
            try:
                processor.release()
            except Exception:
                log.warning("could not release lease", exc_info=True)

    # -- bookkeeping ---------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Start processors for new generations; True if there were any."""
        started = False
        for projection in self.projections:
            rows = self.catalog.rows(projection.name)
            if any(row.role == RETIRED for row in rows):
                self._drop_pending(projection.name)
            for row in rows:
                key = (row.name, row.generation)
                if row.role not in (SERVING, BUILDING) or key in self.processors:
                    continue
                if row.version != projection.version:
                    # Built by other code: it keeps serving as it is until a rebuild replaces it.
                    continue
                self.processors[key] = Processor(
                    self.catalog,
                    self.source,
                    projection,
                    row.generation,
                    self.owner,
                    self.settings,
                )
                started = True
        return started

    def _drop_pending(self, name: str) -> None:
        """Try again to drop retired generations, now and then (each try may wait briefly)."""
        now = time.monotonic()
        if now - self._last_drop.get(name, -DROP_RETRY_SECONDS) < DROP_RETRY_SECONDS:
            return
        self._last_drop[name] = now
        self.catalog.drop_retired(name)

    def _lowest_checkpoint(self) -> Checkpoint:
        """Where to wait from: only processors that hold a lease can act on new events."""
        checkpoints = [
            p.checkpoint for p in self.processors.values() if p.lease is not None and not p.failed
        ]
        # Holding nothing: new events are someone else's to apply, so never wake early.
        return min(checkpoints, default=Checkpoint(2**62, 2**62))
