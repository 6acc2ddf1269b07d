"""Append transactions on PostgreSQL held open, slowed, rolled back or given an early id.

The ledger's PostgreSQL recorder inserts a command's events and commits. These hooks run
inside that transaction right after the INSERT (so the rows hold their transaction id and
position, not yet committed) and before the COMMIT: the states concurrent writers leave a
reader to cope with. Everything else is the product's own code path.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import StoredEvent
from sqlalchemy import BigInteger, Column, Connection, Identity, Integer, MetaData, String, Table
from sqlalchemy import insert as sql_insert

from domain.eventstore import PostgresEventRecorder
from domain.ledger import OrderLedger
from projections.base import Batch, Projection
from projections.engine.source import RecordedEvent
from tests.support.engine import WAIT_TIMEOUT
from tests.support.stores import open_ledger_at

InsideHook = Callable[[Any], None]
"""Called with the recorder's cursor after the events' INSERT ran, before the COMMIT."""


class InjectedRollbackError(RuntimeError):
    """Raised by a hook that made its append transaction fail."""


def current_xid(cursor: Any) -> int | None:
    """The id of the cursor's transaction, if it has taken one (runs everything queued)."""
    with cursor.connection.cursor() as own:
        own.execute("SELECT pg_current_xact_id_if_assigned()::text::bigint AS x")
        row = own.fetchone()
    return None if row is None else row["x"]


def roll_back(cursor: Any) -> None:
    """Make the append transaction fail after its INSERT: its positions become a gap."""
    with cursor.connection.cursor() as own:
        try:
            own.execute("SELECT 1 / 0")
        except psycopg.errors.DivisionByZero as error:
            raise InjectedRollbackError("rolled back on purpose") from error


@contextmanager
def inside_appends(ledger: OrderLedger, hook: InsideHook, *, first: bool = False) -> Iterator[None]:
    """Run ``hook`` inside each of the ledger's append transactions while the block runs,
    after the INSERT (or, with ``first``, before anything else: a transaction that writes
    or locks before its INSERT takes its id early)."""
    recorder = ledger.recorder
    assert isinstance(recorder, PostgresEventRecorder)
    original = recorder._insert_stored_events

    def hooked(curs: Any, stored_events: Sequence[StoredEvent], **kwargs: Any) -> None:
        if first:
            hook(curs)
        original(curs, stored_events, **kwargs)
        if not first:
            current_xid(curs)  # the INSERT has run on the server
            hook(curs)

    recorder._insert_stored_events = hooked  # type: ignore[method-assign]
    try:
        yield
    finally:
        del recorder._insert_stored_events


class HeldAppend:
    """One command run in a thread whose append transaction waits, INSERT done, until released."""

    def __init__(
        self, ledger: OrderLedger, command: Callable[[], Any], *, take_id_first: bool = False
    ) -> None:
        self.inserted = threading.Event()
        self._release = threading.Event()
        self.xid: int | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self._ledger = ledger
        self._command = command
        self._first = take_id_first
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HeldAppend:
        self._thread.start()
        assert self.inserted.wait(WAIT_TIMEOUT), "the held append never inserted"
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        self._release.set()
        self._thread.join(WAIT_TIMEOUT)
        assert not self._thread.is_alive(), "the held append never finished"

    def _hold(self, cursor: Any) -> None:
        if self._first:
            with cursor.connection.cursor() as own:
                own.execute("SELECT pg_current_xact_id()")
        self.xid = current_xid(cursor)
        self.inserted.set()
        self._release.wait(WAIT_TIMEOUT)

    def _run(self) -> None:
        held = False

        def once(cursor: Any) -> None:
            nonlocal held
            if not held:
                held = True
                self._hold(cursor)

        try:
            with inside_appends(self._ledger, once, first=self._first):
                self.result = self._command()
        except BaseException as error:  # reported to the test through .error
            self.error = error
            self.inserted.set()


class DeliveryLogProjection(Projection):
    """Each applied event as a row, numbered in the order it was applied; a position applied
    twice breaks the unique constraint, one never applied is missing."""

    name = "delivery_log"
    version = 1
    handles = ()
    """Every event the store holds."""

    def define_tables(self, metadata: MetaData, suffix: str) -> dict[str, Table]:
        table = Table(
            f"delivery_log{suffix}",
            metadata,
            Column("seq", BigInteger, Identity(), primary_key=True),
            Column("position", BigInteger, nullable=False, unique=True),
            Column("order_id", String(36), nullable=False),
            Column("version", Integer, nullable=False),
        )
        return {"delivery_log": table}

    def batch(self, conn: Connection, tables: dict[str, Table]) -> Batch:
        return _DeliveryLogBatch(conn, tables)


class _DeliveryLogBatch(Batch):
    def __init__(self, conn: Connection, tables: dict[str, Table]) -> None:
        super().__init__(conn, tables)
        self.rows: list[dict[str, Any]] = []

    def handle(self, recorded: RecordedEvent) -> None:
        self.rows.append(
            {
                "position": recorded.position,
                "order_id": str(recorded.event.originator_id),
                "version": recorded.event.originator_version,
            }
        )

    def flush(self) -> None:
        table = self.tables["delivery_log"]
        for row in self.rows:  # one by one: seq follows the order of application
            self.conn.execute(sql_insert(table).values(row))


def chaotic_writer(
    url: str, seed: int, commands: int, hot_orders: Sequence[UUID], ready: Any
) -> None:
    """A writer process: place orders and capture on orders every writer shares (the ledger
    retries lost races), each append transaction held 0-20 ms after its INSERT, some 500 ms,
    and 5% rolled back there."""
    rng = random.Random(seed)
    ledger = open_ledger_at(url)

    def chaos(cursor: Any) -> None:
        roll = rng.random()
        if roll < 0.05:
            roll_back(cursor)
        threading.Event().wait(0.5 if roll > 0.97 else rng.uniform(0, 0.02))

    try:
        ready.wait(WAIT_TIMEOUT)
        with inside_appends(ledger, chaos):
            for index in range(commands):
                try:
                    if rng.random() < 0.3:
                        ledger.capture_payment(
                            rng.choice(list(hot_orders)),
                            amount=1,
                            payment_reference=f"{seed}-{index}",
                        )
                    else:
                        ledger.place_order(
                            customer_id=f"w{seed}",
                            currency="EUR",
                            lines=[{"sku": f"S{index % 3}", "quantity": 1, "unit_price": 100}],
                        )
                except Exception:
                    continue
    finally:
        ledger.close()
