"""The one seam through which projections read the event store.

"Events after this checkpoint, at most N" returns the events and the next checkpoint. A
projection never assumes positions are contiguous: gaps are permanent and normal. Today the
checkpoint is the global position; it could become (transaction id, position) behind this seam.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import psycopg
from eventsourcing.domain import Aggregate
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import get_topic

from domain.ledger import EVENT_NAMES, OrderLedger


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """A domain event and where it sits in the global sequence."""

    position: int
    event: Aggregate.Event

    @property
    def type_name(self) -> str:
        return EVENT_NAMES.get(type(self.event), type(self.event).__qualname__)


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Events after a checkpoint, and the checkpoint a projection may advance to after them."""

    events: list[RecordedEvent]
    checkpoint: int
    head: int
    """The newest position committed when the batch was read."""

    @property
    def reached_head(self) -> bool:
        return self.checkpoint >= self.head


def topics_of(event_types: Sequence[type[Aggregate.Event]]) -> list[str]:
    """The stored topics of the given event classes (what the store filters on)."""
    return [get_topic(cls) for cls in event_types]


class EventSource:
    """Reads committed events by position from the ledger's recorder, and waits for new ones."""

    def __init__(self, ledger: OrderLedger, *, poll_interval: float = 0.05) -> None:
        self._ledger = ledger
        self.poll_interval = poll_interval
        self._listener: _PostgresListener | None = None
        if isinstance(ledger.recorder, PostgresApplicationRecorder):
            self._listener = _PostgresListener(ledger.recorder)

    def head(self) -> int:
        """The newest committed position (0 for an empty store)."""
        return self._ledger.head_position()

    def read(self, after: int, limit: int, topics: Sequence[str] = ()) -> EventBatch:
        """Up to ``limit`` events of the given topics after ``after``, oldest first.

        The head is read first: every position at or below a visible head is final, because
        the store commits in position order (the library's recorders serialise inserts). So
        when fewer than ``limit`` events come back, the checkpoint moves to the head, past
        every event of other topics and every gap.
        """
        head = self.head()
        if head <= after:
            return EventBatch(events=[], checkpoint=after, head=head)
        notifications = self._ledger.recorder.select_notifications(
            start=after, limit=limit, stop=head, topics=topics, inclusive_of_start=False
        )
        mapper = self._ledger.mapper
        events = [
            RecordedEvent(n.id, cast(Aggregate.Event, mapper.to_domain_event(n)))
            for n in notifications
        ]
        checkpoint = events[-1].position if len(events) == limit else head
        return EventBatch(events=events, checkpoint=checkpoint, head=head)

    def timestamp_after(self, position: int) -> float | None:
        """The time (epoch seconds) of the first event after a position, if there is one."""
        notifications = self._ledger.recorder.select_notifications(
            start=position, limit=1, inclusive_of_start=False
        )
        if not notifications:
            return None
        domain_event = cast(Aggregate.Event, self._ledger.mapper.to_domain_event(notifications[0]))
        return domain_event.timestamp.timestamp()

    def wait_for_events(self, after: int, timeout: float) -> None:
        """Block until an event after ``after`` may exist, or the timeout passes.

        PostgreSQL wakes up on the store's NOTIFY; SQLite (and a lost listener) polls.
        """
        deadline = time.monotonic() + timeout
        if self._listener is not None and self._listener.wait(timeout):
            return
        while time.monotonic() < deadline:
            if self.head() > after:
                return
            time.sleep(min(self.poll_interval, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()


class _PostgresListener:
    """LISTENs on the channel the library's recorder NOTIFYs on every insert."""

    def __init__(self, recorder: PostgresApplicationRecorder) -> None:
        self._recorder = recorder
        self._event = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orderledger-listen", daemon=True)
        self._thread.start()

    def wait(self, timeout: float) -> bool:
        woke = self._event.wait(timeout)
        self._event.clear()
        return woke

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._connection() as conn:
                    conn.execute(f'LISTEN "{self._recorder.channel_name}"')
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self._event.set()
            except Exception:
                self._stop.wait(1.0)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        pool = self._recorder.datastore.pool
        kwargs = pool.kwargs() if callable(pool.kwargs) else dict(pool.kwargs or {})
        conninfo = pool.conninfo() if callable(pool.conninfo) else pool.conninfo
        with psycopg.connect(conninfo, autocommit=True, **kwargs) as conn:
            yield conn
