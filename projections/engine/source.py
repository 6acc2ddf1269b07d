"""The one seam through which projections read the event store.

"Events after this checkpoint, at most N" returns the events and the next checkpoint. A
checkpoint is the pair (transaction id, position) of domain/eventstore.py: events are read in
that order, and only up to the store's safe head, so an event committed late with a low
position is read after those that committed before it rather than skipped. A projection never
assumes positions are contiguous: gaps are permanent and normal.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from uuid import UUID

import orjson
import psycopg
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import (
    DatetimeAsISO,
    JSONTranscoder,
    Mapper,
    MapperDeserialisationError,
    Notification,
    Transcoding,
    find_id_convertor,
    pass_through_convertor,
)
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder
from eventsourcing.utils import get_topic, resolve_topic
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier

from domain.eventstore import CHAIN_COLUMN, TX_COLUMN, Checkpoint, Snapshot
from domain.ledger import EVENT_NAMES, OrderLedger
from domain.personal import SEALED, MasterKeyError, SealedValue


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """A domain event, where it sits in the global sequence, and its link in its order's
    hash chain (None for an event stored before chaining began)."""

    position: int
    event: Aggregate.Event
    chain_hash: bytes | None = None
    tx: int = 0
    """The id of the transaction that wrote it (0 on SQLite and for rows of older versions)."""

    @property
    def checkpoint(self) -> Checkpoint:
        """Where it sits in read order."""
        return Checkpoint(self.tx, self.position)

    @property
    def type_name(self) -> str:
        return EVENT_NAMES.get(type(self.event), type(self.event).__qualname__)


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Events after a checkpoint, and the checkpoint a projection may advance to after them."""

    events: list[RecordedEvent]
    checkpoint: Checkpoint
    head: Checkpoint
    """The store's safe head when the batch was read."""

    @property
    def reached_head(self) -> bool:
        return self.checkpoint >= self.head


def topics_of(event_types: Sequence[type[Aggregate.Event]]) -> list[str]:
    """The stored topics of the given event classes (what the store filters on)."""
    return [get_topic(cls) for cls in event_types]


class EventSource:
    """Reads committed events by position from the ledger's recorder, and waits for new ones."""

    def __init__(
        self, ledger: OrderLedger, *, poll_interval: float = 0.05, horizon_poll: float = 0.1
    ) -> None:
        self._ledger = ledger
        self.poll_interval = poll_interval
        self.horizon_poll = horizon_poll
        """While listening, how often to look whether the safe head moved without a NOTIFY."""
        self._listener: _PostgresListener | None = None
        self.server_side = isinstance(ledger.recorder, PostgresApplicationRecorder)
        """Reading waits on a database server (rather than on this process's own work)."""
        if isinstance(ledger.recorder, PostgresApplicationRecorder):
            self._listener = _PostgresListener(ledger.recorder)
        self._rows = _row_reader(ledger)
        self._decode: Callable[..., RecordedEvent] = (
            _Decoder(ledger.mapper)
            if _Decoder.fits(ledger.mapper)
            else _library_decoder(ledger.mapper)
        )

    def head(self) -> int:
        """The newest committed position (0 for an empty store)."""
        return self._ledger.head_position()

    def safe_head(self) -> Checkpoint:
        """The checkpoint a reader may pass now: later events may still be committing."""
        return self._ledger.store.safe_head()

    def oldest_transaction_age(self) -> float:
        """Seconds the oldest transaction still running has held readers back (PostgreSQL)."""
        return self._ledger.store.oldest_transaction_age()

    def snapshot(self) -> Snapshot | None:
        """Which transactions have ended now (PostgreSQL; None on SQLite)."""
        return self._ledger.store.snapshot()

    def last_committed(self) -> Checkpoint:
        """The checkpoint of the last committed event in read order: a reader there has
        applied every event committed so far."""
        return self._ledger.store.last_committed()

    def read(self, after: Checkpoint, limit: int, topics: Sequence[str] = ()) -> EventBatch:
        """Up to ``limit`` events of the given topics after ``after`` in read order.

        The safe head is read first: every event at or before it is final, since every
        transaction that could still add one there has ended. So when fewer than ``limit``
        events come back, the checkpoint moves to the safe head, past every event of other
        topics and every gap.
        """
        return self.read_with_topics(after, limit, topics)[0]

    def read_with_topics(
        self, after: Checkpoint, limit: int, topics: Sequence[str] = ()
    ) -> tuple[EventBatch, list[str]]:
        """``read``, and the stored topic of each event in the batch."""
        head = self.safe_head()
        if head <= after:
            return EventBatch(events=[], checkpoint=after, head=head), []
        decode = self._decode
        rows = self._rows(after, head, topics, limit)
        events = [decode(*row) for row in rows]
        stored = [row[3] for row in rows]
        checkpoint = events[-1].checkpoint if len(events) == limit else head
        return EventBatch(events=events, checkpoint=checkpoint, head=head), stored

    def stored_rows(self, after: Checkpoint, stop: Checkpoint, limit: int) -> list[StoredRow]:
        """Up to ``limit`` events after ``after`` up to ``stop`` in read order as stored,
        undecoded: (position, originator id, version, topic, state bytes, chain hash, tx)."""
        return self._rows(after, stop, (), limit)

    def timestamp_after(self, after: Checkpoint) -> float | None:
        """The time (epoch seconds) of the first event after a checkpoint, if there is one
        (committing or not yet safe to pass, too: it is waiting all the same)."""
        rows = self._rows(after, Checkpoint(2**63 - 1, 2**63 - 1), (), 1)
        if not rows:
            return None
        return self._decode(*rows[0]).event.timestamp.timestamp()

    def wait_for_events(
        self, after: Checkpoint, timeout: float, stop: threading.Event | None = None
    ) -> None:
        """Block until an event after ``after`` may be safe to read, the timeout passes, or
        ``stop`` is set.

        PostgreSQL wakes up on the store's NOTIFY, and polls too: the safe head also moves
        when a transaction that held it back ends, which notifies nobody. SQLite (and a lost
        listener) polls.
        """
        stopped = stop or threading.Event()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            listener = self._listener
            if listener is not None and listener.connected:
                if listener.wait(min(left, self.horizon_poll)):
                    return
            else:
                stopped.wait(min(self.poll_interval, left))
            if stopped.is_set() or self.safe_head() > after:
                return

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()


class SharedReads:
    """Reads shared by the projections of one worker for one round of steps.

    Projections that start from the same position get one read of the events of all their
    topics, each keeping those of its own topics, with the shared checkpoint: every event of
    its topics up to that checkpoint is in the shared batch, since the read covered them all.
    Live, a worker with five projections reads the store once per new event instead of five
    times.
    """

    def __init__(self, source: EventSource, topic_lists: Sequence[Sequence[str]]) -> None:
        self._source = source
        # No topics means every event; then so does the shared read.
        self._topics = (
            []
            if not topic_lists or any(not topics for topics in topic_lists)
            else sorted({topic for topics in topic_lists for topic in topics})
        )
        self._batches: dict[tuple[Checkpoint, int], tuple[EventBatch, list[str]]] = {}

    def read(self, after: Checkpoint, limit: int, topics: Sequence[str]) -> EventBatch:
        """What ``EventSource.read(after, limit, topics)`` could return, read once per round."""
        if not topics and self._topics:
            return self._source.read(after, limit, topics)
        key = (after, limit)
        found = self._batches.get(key)
        if found is None:
            found = self._batches[key] = self._source.read_with_topics(after, limit, self._topics)
        batch, stored = found
        wanted = set(topics)
        if not topics or (self._topics and wanted.issuperset(self._topics)):
            return batch
        events = [
            recorded
            for recorded, topic in zip(batch.events, stored, strict=True)
            if topic in wanted
        ]
        return EventBatch(events=events, checkpoint=batch.checkpoint, head=batch.head)


StoredRow = tuple[int, Any, int, str, bytes, bytes | None, int]
"""(position, originator id, version, topic, state, chain hash, transaction id) of one event."""
_Rows = Callable[[Checkpoint, Checkpoint, Sequence[str], int], list[StoredRow]]
"""(after, stop, topics, limit) -> stored rows in read order."""


def _row_reader(ledger: OrderLedger) -> _Rows:
    """The store's rows in read order as plain tuples, for bulk reads.

    The library's ``select_notifications`` builds a Notification (and on SQLite a UUID) per
    row; reading plain tuples through the recorder's own connections and decoding once is
    about twice as fast during catch-up.
    """
    recorder = ledger.recorder
    if isinstance(recorder, SQLiteApplicationRecorder):
        return _sqlite_rows(recorder)
    if isinstance(recorder, PostgresApplicationRecorder):
        return _postgres_rows(recorder)
    raise NotImplementedError(f"no row reader for {type(recorder).__name__}")


def _sqlite_rows(recorder: SQLiteApplicationRecorder) -> _Rows:
    table = recorder.events_table_name
    # One writer: every transaction id is 0 and read order is position order.
    # Our own table name; the values are bound parameters.
    base = (
        f"SELECT rowid, originator_id, originator_version, topic, state, {CHAIN_COLUMN}, 0 "  # noqa: S608
        f"FROM {table} "
        "WHERE rowid>? AND rowid<=? "
    )
    order = "ORDER BY rowid LIMIT ?"
    as_uuid = recorder.datastore.originator_id_type == "uuid"

    def rows(
        after: Checkpoint, stop: Checkpoint, topics: Sequence[str], limit: int
    ) -> list[StoredRow]:
        statement = base
        if topics:
            statement += f"AND topic IN ({','.join('?' * len(topics))}) "
        statement += order
        with recorder.datastore.transaction(commit=False) as c:
            cursor = c.sqlite_cursor
            cursor.row_factory = None
            cursor.execute(statement, (after.position, stop.position, *topics, limit))
            fetched = cursor.fetchall()
        if as_uuid:
            # An order's events mostly share a batch: parse each originator id once.
            ids: dict[str, UUID] = {}
            return [
                (p, ids.get(i) or ids.setdefault(i, UUID(i)), v, t, s, h, x)
                for p, i, v, t, s, h, x in fetched
            ]
        return fetched

    return rows


def _postgres_rows(recorder: PostgresApplicationRecorder) -> _Rows:
    columns = SQL(
        # Named apart from the column: ORDER BY {tx} must sort by the indexed xid8.
        "SELECT notification_id, originator_id, originator_version, topic, state, {chain}, "
        "{tx}::text::bigint AS read_tx FROM {schema}.{table} "
        "WHERE ({tx}, notification_id) > (%s::text::xid8, %s) "
        "AND ({tx}, notification_id) <= (%s::text::xid8, %s)"
    ).format(
        schema=Identifier(recorder.datastore.schema),
        table=Identifier(recorder.events_table_name),
        chain=Identifier(CHAIN_COLUMN),
        tx=Identifier(TX_COLUMN),
    )
    order = SQL(" ORDER BY {tx}, notification_id LIMIT %s").format(tx=Identifier(TX_COLUMN))
    with_topics = columns + SQL(" AND topic = ANY(%s)") + order
    without_topics = columns + order

    def rows(
        after: Checkpoint, stop: Checkpoint, topics: Sequence[str], limit: int
    ) -> list[StoredRow]:
        statement, params = (
            (with_topics, (*after, *stop, list(topics), limit))
            if topics
            else (without_topics, (*after, *stop, limit))
        )
        with (
            recorder.datastore.get_connection() as conn,
            conn.cursor(row_factory=tuple_row) as cursor,
        ):
            cursor.execute(statement, params, prepare=True)
            return cursor.fetchall()

    return rows


def _library_decoder(mapper: Mapper[Any]) -> Callable[..., RecordedEvent]:
    """Decode rows with the library's own mapper (a cipher or a compressor configured)."""

    def decode(
        position: int,
        originator_id: Any,
        version: int,
        topic: str,
        state: bytes,
        chain_hash: bytes | None,
        tx: int,
    ) -> RecordedEvent:
        notification = Notification(
            id=position,
            originator_id=originator_id,
            originator_version=version,
            topic=topic,
            state=bytes(state),
        )
        event = cast(Aggregate.Event, mapper.to_domain_event(notification))
        return RecordedEvent(position, event, chain_hash, tx)

    return decode


_TYPED = b'"_type_"'


class _Decoder:
    """``Mapper.to_domain_event`` for a plain JSON mapper (no cipher, no compressor), per row.

    The same steps in the same order (decode the state, convert the originator id, upcast,
    build the event without calling its constructor), with the per-topic lookups cached.
    Decoding the JSON is most of the cost of a catch-up: a state whose only transcoded value
    is the top-level ``timestamp`` (every Order event) is parsed by orjson, about three times
    faster, and that one value decoded by the transcoder's own transcoding; any other state
    goes through the transcoder as before.
    """

    def __init__(self, mapper: Mapper[Any]) -> None:
        transcoder = cast(JSONTranscoder, mapper.transcoder)
        self._decode_state = transcoder.decode
        self._transcodings: dict[str, Transcoding] = transcoder.names
        sealed = self._transcodings.get(SEALED)
        self._open: Callable[[Any], Any] = (
            sealed.decode if sealed is not None else _no_personal_data
        )
        self._classes: dict[str, tuple[type[Any], Callable[[Any], Any], int]] = {}

    @staticmethod
    def fits(mapper: Mapper[Any]) -> bool:
        return (
            type(mapper) is Mapper
            and type(mapper.transcoder) is JSONTranscoder
            and mapper.cipher is None
            and mapper.compressor is None
        )

    def _state(self, state: bytes) -> dict[str, Any]:
        typed = state.count(_TYPED)
        try:
            parsed = orjson.loads(state)
        except orjson.JSONDecodeError:
            return cast(dict[str, Any], self._decode_state(state))
        if type(parsed) is not dict:
            return cast(dict[str, Any], self._decode_state(state))
        if typed == 0:
            return parsed
        # Typed values at the top level (the timestamp, personal values) are decoded here;
        # a state with any other typed value goes through the transcoder as before.
        found = 0
        for key, value in parsed.items():
            if type(value) is not dict or len(value) != 2 or "_data_" not in value:
                continue
            name = value.get("_type_")
            data = value["_data_"]
            if name == SEALED:
                # Opened only if a projection asks (most never read personal data).
                parsed[key] = SealedValue(data, self._open)
            else:
                transcoding = self._transcodings.get(name)  # type: ignore[arg-type]
                if transcoding is None:
                    return cast(dict[str, Any], self._decode_state(state))
                # DatetimeAsISO.decode is this call behind an isinstance assertion.
                if type(transcoding) is DatetimeAsISO and type(data) is str:
                    parsed[key] = datetime.fromisoformat(data)
                else:
                    parsed[key] = transcoding.decode(data)
            found += 1
        if found == typed:
            return parsed
        return cast(dict[str, Any], self._decode_state(state))

    def __call__(
        self,
        position: int,
        originator_id: Any,
        version: int,
        topic: str,
        state: bytes,
        chain_hash: bytes | None,
        tx: int,
    ) -> RecordedEvent:
        try:
            cls, convert, class_version = self._classes[topic]
        except KeyError:
            cls = resolve_topic(topic)
            convert = find_id_convertor(cls, cast(Hashable, type(originator_id)))
            class_version = getattr(cls, "class_version", 1)
            self._classes[topic] = (cls, convert, class_version)
        try:
            event_state = self._state(state if type(state) is bytes else bytes(state))
        except Exception as error:
            raise MapperDeserialisationError(
                f"Failed to deserialise state of stored event with topic '{topic}', "
                f"originator_id '{originator_id}' and originator_version {version}: {error}"
            ) from error
        event_state["originator_id"] = (
            originator_id if convert is pass_through_convertor else convert(originator_id)
        )
        event_state["originator_version"] = version
        from_version = event_state.pop("class_version", 1)
        while from_version < class_version:
            getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(event_state)
            from_version += 1
        domain_event = _new(cls)
        _set_attribute(domain_event, "__dict__", event_state)
        # RecordedEvent(position, domain_event, chain_hash, tx) without the frozen dataclass's
        # __init__.
        recorded = _new(RecordedEvent)
        _set_position(recorded, position)
        _set_event(recorded, domain_event)
        _set_chain_hash(recorded, chain_hash)
        _set_tx(recorded, tx)
        return recorded


def _no_personal_data(_: Any) -> Any:
    raise MasterKeyError("personal data cannot be read: the ledger has no master key")


_new = object.__new__
_set_attribute = object.__setattr__
_recorded_slots: Any = RecordedEvent
_set_position = _recorded_slots.position.__set__
_set_event = _recorded_slots.event.__set__
_set_chain_hash = _recorded_slots.chain_hash.__set__
_set_tx = _recorded_slots.tx.__set__


class _PostgresListener:
    """LISTENs on the channel the library's recorder NOTIFYs on every insert."""

    def __init__(self, recorder: PostgresApplicationRecorder) -> None:
        self._recorder = recorder
        self._event = threading.Event()
        self._stop = threading.Event()
        self.connected = False
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
                    self.connected = True
                    # Events committed while we were not listening: let the worker look.
                    self._event.set()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self._event.set()
            except Exception:  # polling covers us until we listen again
                self.connected = False
                self._event.set()
                self._stop.wait(1.0)
        self.connected = False

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        pool = self._recorder.datastore.pool
        kwargs = pool.kwargs() if callable(pool.kwargs) else dict(pool.kwargs or {})
        conninfo = pool.conninfo() if callable(pool.conninfo) else pool.conninfo
        with psycopg.connect(conninfo, autocommit=True, **kwargs) as conn:
            yield conn
