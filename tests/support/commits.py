"""Append statements on PostgreSQL held open, slowed, rolled back or given an early id.

The ledger's PostgreSQL recorder appends a command's events with one statement that commits
on its own. Test triggers on the events table act inside that statement, as the plan the
test set for the writer's session says: after the INSERT (the rows hold their transaction id
and position, not yet committed) or, to take the id early, before it. These are the states
concurrent writers leave a reader to cope with; everything else is the product's own code.
"""

from __future__ import annotations

import random
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import StoredEvent
from psycopg.sql import SQL, Identifier, Literal
from sqlalchemy import BigInteger, Column, Connection, Identity, Integer, MetaData, String, Table
from sqlalchemy import insert as sql_insert

from domain.eventstore import PostgresEventRecorder
from domain.ledger import OrderLedger
from projections.base import Batch, Projection
from projections.engine.source import RecordedEvent
from tests.support.engine import WAIT_TIMEOUT
from tests.support.stores import open_ledger_at
from tests.support.waiting import wait_for

PLAN_SETTING = "orderledger_test.append"
"""The session setting the triggers read: ``when:action[:argument]``, empty for nothing."""

ROLL_BACK = "after:fail"
"""Fail the append statement after its INSERT: its positions become a gap."""

TAKE_AN_ID = "before:id"
"""Take the transaction's id before the INSERT, as a transaction that wrote first would."""

Plan = Callable[[], str | None]
"""What the next append statement does inside the server (None: nothing)."""


def slept(seconds: float) -> str:
    """Keep the statement open ``seconds`` after its INSERT."""
    return f"after:sleep:{seconds:.4f}"


def held(lock: int, *, first: bool = False) -> str:
    """Wait for the advisory lock ``lock`` after the INSERT (or, with ``first``, before it
    with an id taken): the statement stays open until whoever holds the lock lets it go."""
    return f"{'before' if first else 'after'}:hold:{lock}"


INJECTED_ROLLBACK = "rolled back on purpose"


class InjectedRollbackError(RuntimeError):
    """Raised by the trigger that made an append statement fail."""


def _install_triggers(recorder: PostgresEventRecorder) -> None:
    """The plan triggers on the recorder's events table, once, whoever asks first."""
    schema = recorder.datastore.schema
    table = recorder.events_table_name
    function = Identifier(schema, f"{table}_test_plan")
    body = (
        "DECLARE plan text[] := string_to_array("
        f"coalesce(current_setting('{PLAN_SETTING}', true), ''), ':'); "
        "BEGIN IF plan[1] IS DISTINCT FROM lower(TG_WHEN) THEN RETURN NULL; END IF; "
        "PERFORM pg_current_xact_id(); "
        f"IF plan[2] = 'fail' THEN RAISE EXCEPTION '{INJECTED_ROLLBACK}'; "
        "ELSIF plan[2] = 'sleep' THEN PERFORM pg_sleep(plan[3]::float8); "
        "ELSIF plan[2] = 'hold' THEN PERFORM pg_advisory_xact_lock(plan[3]::bigint); "
        "END IF; RETURN NULL; END"
    )
    create = [
        SQL("CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS {body}").format(
            function=function, body=Literal(body)
        )
    ] + [
        SQL(
            "CREATE TRIGGER {trigger} {when} INSERT ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        ).format(
            # Triggers of one kind fire in name order: these first, before any test's own.
            trigger=Identifier(f"a_test_plan_{when.lower()}"),
            when=SQL(when),
            table=Identifier(schema, table),
            function=function,
        )
        for when in ("BEFORE", "AFTER")
    ]
    statements = "; ".join(statement.as_string(None) for statement in create)
    lock = zlib.crc32(f"{schema}.{table}.test_plan".encode())
    with recorder.datastore.get_connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
        installed = conn.execute(
            "SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = %s AND p.proname = %s",
            (schema, f"{table}_test_plan"),
        ).fetchone()
        if installed is None:
            conn.execute(statements)


@contextmanager
def inside_appends(ledger: OrderLedger, plan: Plan) -> Iterator[None]:
    """Give each of the ledger's append statements the plan ``plan()`` returns while the
    block runs (set on the writer's session just before the statement, cleared after)."""
    recorder = ledger.recorder
    assert isinstance(recorder, PostgresEventRecorder)
    _install_triggers(recorder)
    original = recorder._insert_stored_events

    def planned(curs: Any, stored_events: Sequence[StoredEvent], **kwargs: Any) -> None:
        step = plan()
        if step is None:
            original(curs, stored_events, **kwargs)
            return
        with curs.connection.cursor() as own:
            own.execute("SELECT set_config(%s, %s, false)", (PLAN_SETTING, step))
        try:
            original(curs, stored_events, **kwargs)
        except psycopg.errors.RaiseException as error:
            if error.diag.message_primary != INJECTED_ROLLBACK:
                raise
            raise InjectedRollbackError(INJECTED_ROLLBACK) from error
        finally:
            with curs.connection.cursor() as own:
                own.execute("SELECT set_config(%s, '', false)", (PLAN_SETTING,))

    recorder._insert_stored_events = planned  # type: ignore[method-assign]
    try:
        yield
    finally:
        del recorder._insert_stored_events


def connect_beside(ledger: OrderLedger) -> psycopg.Connection[Any]:
    """A connection of its own (autocommit, tuples) to the ledger's PostgreSQL store."""
    datastore = ledger.recorder.datastore  # type: ignore[attr-defined]
    kwargs = {k: v for k, v in datastore.pool.kwargs.items() if k != "row_factory"}
    return psycopg.connect(datastore.pool.conninfo, autocommit=True, **kwargs)


def lock_awaited(conn: psycopg.Connection[Any], lock: int) -> bool:
    """Whether a session waits for advisory lock ``lock``."""
    row = conn.execute(
        "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND classid = 0 AND objid = %s AND objsubid = 1",
        (lock,),
    ).fetchone()
    return row is not None


class HeldAppend:
    """One command run in a thread whose append statement waits, INSERT done (or, with
    ``take_id_first``, only its id taken), until released."""

    def __init__(
        self, ledger: OrderLedger, command: Callable[[], Any], *, take_id_first: bool = False
    ) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._ledger = ledger
        self._command = command
        self._lock = random.randrange(1, 2**31)
        self._plan = held(self._lock, first=take_id_first)
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._gate = connect_beside(ledger)

    def __enter__(self) -> HeldAppend:
        self._gate.execute("SELECT pg_advisory_lock(%s)", (self._lock,))
        self._thread.start()

        wait_for(
            lambda: lock_awaited(self._gate, self._lock) or self._finished.is_set(),
            "the held append waits inside its statement",
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._gate.closed:
            return
        self._gate.execute("SELECT pg_advisory_unlock(%s)", (self._lock,))
        self._thread.join(WAIT_TIMEOUT)
        self._gate.close()
        assert not self._thread.is_alive(), "the held append never finished"

    def _run(self) -> None:
        plans = iter([self._plan])  # the command's first append only

        try:
            with inside_appends(self._ledger, lambda: next(plans, None)):
                self.result = self._command()
        except BaseException as error:  # reported to the test through .error
            self.error = error
        finally:
            self._finished.set()


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
    retries lost races), each append statement held 0-20 ms after its INSERT, some 500 ms,
    and 5% rolled back there."""
    rng = random.Random(seed)
    ledger = open_ledger_at(url)

    def chaos() -> str:
        roll = rng.random()
        if roll < 0.05:
            return ROLL_BACK
        return slept(0.5 if roll > 0.97 else rng.uniform(0, 0.02))

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
