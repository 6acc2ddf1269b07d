"""The append-only event store: the library's recorders, made immutable, chained and able to
list one order.

Both recorders add database triggers that reject ``UPDATE`` and ``DELETE`` on the events
table, created with the table; a ``chain_hash`` column holding each event's link in its
order's hash chain (domain/chain.py), written with the event and added to tables made by
older versions (their events stay unchained); and a query for one aggregate's events with
their global positions (the notification ids) and hashes, for audit.

Readers pass events in *read order*, a ``Checkpoint`` pair (transaction id, position). SQLite
has one writer, so its transaction id is always 0 and read order is position order. The
PostgreSQL recorder takes no table lock: writers commit in parallel, so a lower position can
commit after a higher one. Each row stores its writing transaction's id, and readers pass only
rows whose transaction is older than every transaction still running (see ``safe_head``).
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import parse_qs, unquote, urlsplit
from uuid import UUID

from eventsourcing.persistence import (
    IntegrityError,
    InterfaceError,
    Notification,
    OperationalError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder
from eventsourcing.utils import retry
from psycopg.sql import SQL, Composable, Composed, Identifier, Literal

from domain.chain import chain_hashes
from domain.idempotency import IDEMPOTENCY_TABLE, LEGACY_RECORD_TOPIC, CommandKey
from domain.sqlite_writes import GroupCommit, Grouped, sqlite_write_lock

IMMUTABLE_MESSAGE = "events are immutable"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


CHAIN_COLUMN = "chain_hash"
DATA_KEYS_TABLE = "customer_data_keys"
"""Where domain/personal.py keeps customers' data keys; a new one is inserted with its events."""


TX_COLUMN = "tx_id"
NOTIFY_INTERVAL = 0.02
"""At most one NOTIFY per this many seconds per process: readers also poll."""
WRITE_STATEMENT_TIMEOUT = "30s"
"""No statement of an append runs longer (a stuck writer holds every reader back)."""
_EVENT_ROW = "(%s, %s, %s, %s, %s)"
MAX_EVENTS_PER_STATEMENT = 13_000
"""PostgreSQL takes at most 65,535 parameters in a statement; each event is five."""


class Checkpoint(NamedTuple):
    """A place in read order: every event whose (transaction id, position) is at or before it.

    Pairs compare as tuples. Rows written before transaction ids were recorded, and every
    SQLite row, have transaction id 0, so a position-only checkpoint ``p`` of an older version
    is ``Checkpoint(0, p)``.
    """

    tx: int
    position: int


START = Checkpoint(0, 0)
"""Before the first event."""


class Snapshot(NamedTuple):
    """Which transactions had ended at a moment: PostgreSQL's ``pg_current_snapshot()``.

    Read order cannot say it alone: a transaction still running then may have a lower id
    than one already committed, and commit later.
    """

    xmin: int
    xmax: int
    running: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        """From PostgreSQL's text form, ``xmin:xmax:running,ids``."""
        xmin, xmax, running = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(tx) for tx in running.split(",") if tx))

    def __str__(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(map(str, sorted(self.running)))}"

    def ended(self, tx: int) -> bool:
        """Whether transaction ``tx`` had committed or rolled back by then (0, the id of rows
        older versions wrote, always had)."""
        return tx < self.xmin or (tx < self.xmax and tx not in self.running)


def passed_by_position(checkpoint: Checkpoint, position: int) -> bool:
    """Whether a checkpoint has surely passed ``position`` without looking up the transaction
    of the event there: a checkpoint of transaction id 0 (every SQLite one, and on PostgreSQL
    those within the rows of older versions, which precede every later row) passes exactly
    the positions up to its own."""
    return checkpoint.tx == 0 and checkpoint.position >= position


def reached_at(store: PositionedRecorder, position: int) -> Checkpoint:
    """The checkpoint at which a reader has passed the event at ``position``; for a position
    with no committed event (a gap), the safe head: everything committed by now."""
    return store.checkpoint_at(position) or store.safe_head()


class StoreFromAnotherClusterError(RuntimeError):
    """The events carry transaction ids this PostgreSQL cluster has not reached yet."""


@dataclass(frozen=True)
class ChainedNotification(Notification):
    """A stored event with its global position and its link in the order's hash chain
    (None for an event stored before chaining began)."""

    chain_hash: bytes | None = None
    tx: int = 0
    """The id of the transaction that wrote it (0 on SQLite and for rows of older versions)."""


class PositionedRecorder(Protocol):
    """What the ledger needs beyond the library's ApplicationRecorder."""

    def select_aggregate_notifications(
        self, originator_id: UUID, *, lte_version: int | None = None
    ) -> Sequence[ChainedNotification]: ...

    def max_notification_id(self) -> int | None: ...

    def safe_head(self) -> Checkpoint: ...

    def last_committed(self) -> Checkpoint: ...

    def oldest_transaction_age(self) -> float: ...

    def snapshot(self) -> Snapshot | None: ...

    def checkpoint_at(self, position: int) -> Checkpoint | None: ...

    def command_key(self, key: str) -> CommandKey | None: ...


class _Chained:
    """How both recorders link the events they are about to insert."""

    def links(
        self,
        stored_events: Sequence[StoredEvent],
        previous: Callable[[UUID | str, int], bytes | None],
    ) -> Sequence[bytes | None]:
        return chain_hashes(stored_events, previous)


_Save = tuple[Sequence[StoredEvent], Sequence[bytes | None], dict[str, Any]]
"""One save on SQLite: its events, their chain links and the library's keyword arguments."""


class SQLiteEventRecorder(_Chained, SQLiteApplicationRecorder):
    """The library's SQLite recorder with immutability triggers and per-order positions.

    The library's table keeps positions in SQLite's implicit rowid, which VACUUM may renumber.
    Ours declares the rowid as an AUTOINCREMENT primary key: positions never change and are
    never reused, and the library's ``SELECT rowid, *`` queries read them unchanged.
    """

    def __init__(self, datastore: Any, events_table_name: str = "stored_events") -> None:
        super().__init__(datastore, events_table_name)
        self.insert_events_statement = (
            f"INSERT INTO {events_table_name} "  # noqa: S608 - our own table name
            f"(originator_id, originator_version, topic, state, {CHAIN_COLUMN}) VALUES (?,?,?,?,?)"
        )
        self._previous_hash_statement = (
            f"SELECT {CHAIN_COLUMN} FROM {events_table_name} "  # noqa: S608 - our own table name
            "WHERE originator_id = ? AND originator_version = ?"
        )
        self.write_lock = sqlite_write_lock(datastore.pool.db_name)
        # Saves queue with the read models' writers on one lock that hands over at once,
        # rather than on SQLite's busy handler; saves that queued together commit together.
        self.groups = GroupCommit(self.write_lock, self._write_group)

    def create_table(self) -> None:
        with self.write_lock.hold(), self.datastore.transaction(commit=True) as c:
            self._create_table(c)
            # A table made before events were chained gets the column; its rows stay unchained.
            c.execute(f"PRAGMA table_info({self.events_table_name})")
            if CHAIN_COLUMN not in {row["name"] for row in c.fetchall()}:
                c.execute(f"ALTER TABLE {self.events_table_name} ADD COLUMN {CHAIN_COLUMN} BLOB")
            c.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                (IDEMPOTENCY_TABLE,),
            )
            if c.fetchone() is None:
                # Created with the keys earlier versions stored as events: never half there.
                c.execute(
                    f"CREATE TABLE {IDEMPOTENCY_TABLE} (key TEXT PRIMARY KEY, "
                    "fingerprint TEXT NOT NULL, order_id TEXT NOT NULL, "
                    "order_version INTEGER NOT NULL) WITHOUT ROWID"
                )
                c.execute(
                    f"INSERT INTO {IDEMPOTENCY_TABLE} SELECT "  # noqa: S608 - our own tables
                    "json_extract(j, '$.key'), json_extract(j, '$.fingerprint'), "
                    "json_extract(j, '$.order_id._data_'), json_extract(j, '$.order_version') "
                    f"FROM (SELECT CAST(state AS TEXT) AS j FROM {self.events_table_name} "
                    "WHERE topic = ?)",
                    (LEGACY_RECORD_TOPIC,),
                )

    def command_key(self, key: str) -> CommandKey | None:
        """The key's first outcome, if a command was recorded with it."""
        with self.datastore.transaction(commit=False) as c:
            c.execute(
                "SELECT fingerprint, order_id, order_version "  # noqa: S608 - our own table
                f"FROM {IDEMPOTENCY_TABLE} WHERE key = ?",
                (key,),
            )
            row = c.fetchone()
        if row is None:
            return None
        return CommandKey(key, row["fingerprint"], UUID(row["order_id"]), row["order_version"])

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        # The previous events' hashes are read before the write transaction begins: a
        # transaction that reads first and then writes gets SQLITE_BUSY at once, without
        # waiting, when another connection holds the write lock. Those events are committed
        # and never change (a save whose previous event is not yet committed conflicts).
        links = self.links(stored_events, self._previous_hash)
        return self.groups.submit((stored_events, links, kwargs))

    def _write_group(self, group: Sequence[Grouped[_Save, Sequence[int] | None]]) -> None:
        """Write saves that arrived together in one transaction, each in a savepoint of its
        own: a save that conflicts is undone alone and raises the library's IntegrityError."""
        with self.datastore.transaction(commit=True) as c:
            if len(group) == 1:
                stored_events, links, kwargs = group[0].item
                group[0].result = self._insert_events(c, stored_events, links=links, **kwargs)
                return
            for save in group:
                stored_events, links, kwargs = save.item
                c.execute("SAVEPOINT grouped_save")
                try:
                    save.result = self._insert_events(c, stored_events, links=links, **kwargs)
                except sqlite3.IntegrityError as error:
                    c.execute("ROLLBACK TO grouped_save")
                    save.error = IntegrityError(error)
                c.execute("RELEASE grouped_save")

    def _previous_hash(self, originator_id: UUID | str, version: int) -> bytes | None:
        with self.datastore.transaction(commit=False) as c:
            c.execute(self._previous_hash_statement, (_hex(originator_id), version))
            row = c.fetchone()
        return None if row is None else bytes(row[0]) if row[0] is not None else None

    def _insert_events(
        self,
        c: Any,
        stored_events: Sequence[StoredEvent],
        *,
        links: Sequence[bytes | None] = (),
        data_keys: Sequence[dict[str, Any]] = (),
        command_key: CommandKey | None = None,
        **_: Any,
    ) -> Sequence[int] | None:
        if command_key is not None:
            c.execute(
                f"INSERT INTO {IDEMPOTENCY_TABLE} "  # noqa: S608 - our own table name
                "(key, fingerprint, order_id, order_version) VALUES (?, ?, ?, ?)",
                (
                    command_key.key,
                    command_key.fingerprint,
                    command_key.order_id.hex,
                    command_key.order_version,
                ),
            )
        returning = []
        for stored, link in zip(stored_events, links, strict=True):
            c.execute(
                self.insert_events_statement,
                (
                    _hex(stored.originator_id),
                    stored.originator_version,
                    stored.topic,
                    stored.state,
                    link,
                ),
            )
            returning.append(c.lastrowid)
        if data_keys:
            c.executemany(
                f"INSERT INTO {DATA_KEYS_TABLE} "  # noqa: S608 - our own table name
                "(key_id, customer_id, wrapped_key, master_key_id, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (
                        row["key_id"],
                        row["customer_id"],
                        row["wrapped_key"],
                        row["master_key_id"],
                        # As SQLAlchemy stores a DateTime on SQLite.
                        row["created_at"].strftime("%Y-%m-%d %H:%M:%S.%f"),
                    )
                    for row in data_keys
                ],
            )
        return returning

    def construct_create_table_statements(self) -> list[str]:
        table = self.events_table_name
        return [
            f"CREATE TABLE IF NOT EXISTS {table} ("
            "rowid INTEGER PRIMARY KEY AUTOINCREMENT, "
            "originator_id TEXT NOT NULL, "
            "originator_version INTEGER NOT NULL, "
            "topic TEXT, "
            "state BLOB, "
            f"{CHAIN_COLUMN} BLOB, "
            "UNIQUE (originator_id, originator_version))",
            *(
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{IMMUTABLE_MESSAGE}: {op} on {table} "
                "is not allowed'); END"
                for op in ("UPDATE", "DELETE")
            ),
        ]

    def safe_head(self) -> Checkpoint:
        """The newest event: with one writer, every committed event is final."""
        return Checkpoint(0, self.max_notification_id() or 0)

    def last_committed(self) -> Checkpoint:
        """The newest event (see the PostgreSQL recorder's)."""
        return self.safe_head()

    def oldest_transaction_age(self) -> float:
        """Nothing holds readers back on SQLite (see the PostgreSQL recorder's)."""
        return 0.0

    def snapshot(self) -> Snapshot | None:
        """None: with one writer, the safe head already says what had committed."""
        return None

    def checkpoint_at(self, position: int) -> Checkpoint | None:
        """Where the event at ``position`` sits in read order: with one writer, (0, position)."""
        return Checkpoint(0, position) if position > 0 else None

    def select_aggregate_notifications(
        self, originator_id: UUID, *, lte_version: int | None = None
    ) -> Sequence[ChainedNotification]:
        columns = f"rowid, originator_id, originator_version, topic, state, {CHAIN_COLUMN}"
        # Our own table name; the values are bound parameters.
        statement = f"SELECT {columns} FROM {self.events_table_name} WHERE originator_id = ?"  # noqa: S608
        params: list[Any] = [originator_id.hex]
        if lte_version is not None:
            statement += " AND originator_version <= ?"
            params.append(lte_version)
        statement += " ORDER BY originator_version"
        with self.datastore.transaction(commit=False) as c:
            c.execute(statement, params)
            return [
                ChainedNotification(
                    id=row["rowid"],
                    originator_id=self.convert_originator_id(row["originator_id"]),
                    originator_version=row["originator_version"],
                    topic=row["topic"],
                    state=row["state"],
                    chain_hash=row[CHAIN_COLUMN],
                )
                for row in c.fetchall()
            ]


class PostgresEventRecorder(_Chained, PostgresApplicationRecorder):
    """The library's PostgreSQL recorder with immutability triggers and per-order positions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        schema = Identifier(self.datastore.schema)
        table = Identifier(self.events_table_name)
        function = Identifier(f"{self.events_table_name}_reject_change")
        # Wrapped in DO blocks so several processes starting at once do not trip over each other.
        self.sql_create_statements.append(
            SQL(
                "DO $do$ BEGIN "
                "CREATE FUNCTION {schema}.{function}() RETURNS trigger LANGUAGE plpgsql AS $fn$ "
                "BEGIN RAISE EXCEPTION '" + IMMUTABLE_MESSAGE + ": % on % is not allowed', "
                "TG_OP, TG_TABLE_NAME USING ERRCODE = 'restrict_violation'; END $fn$; "
                "EXCEPTION WHEN duplicate_function OR unique_violation THEN NULL; END $do$"
            ).format(schema=schema, function=function)
        )
        for name, timing in (
            ("no_update_delete", "BEFORE UPDATE OR DELETE ON {schema}.{table} FOR EACH ROW"),
            ("no_truncate", "BEFORE TRUNCATE ON {schema}.{table} FOR EACH STATEMENT"),
        ):
            self.sql_create_statements.append(
                SQL(
                    "DO $do$ BEGIN CREATE TRIGGER {trigger} " + timing + " "
                    "EXECUTE FUNCTION {schema}.{function}(); "
                    "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $do$"
                ).format(
                    trigger=Identifier(f"{self.events_table_name}_{name}"),
                    schema=schema,
                    table=table,
                    function=function,
                )
            )
        # A table made before events were chained gets the column; its rows stay unchained.
        self.sql_create_statements.append(self._added_column(CHAIN_COLUMN, SQL("bytea")))
        # Each row records its writing transaction's id (readers order by it); a table made by
        # an older version gets the column with 0 for its rows, which were written under the
        # table lock and so committed in position order. One statement: never half there.
        self.sql_create_statements.append(
            self._added_column(
                TX_COLUMN,
                SQL(
                    "xid8 NOT NULL DEFAULT '0', "
                    "ALTER COLUMN {column} SET DEFAULT pg_current_xact_id()"
                ).format(column=Identifier(TX_COLUMN)),
            )
        )
        self.sql_create_statements.append(
            SQL(
                "CREATE INDEX IF NOT EXISTS {index} ON {schema}.{table} ({column}, notification_id)"
            ).format(
                index=Identifier(f"{self.events_table_name}_read_order"),
                schema=schema,
                table=table,
                column=Identifier(TX_COLUMN),
            )
        )
        safe = SQL("{column} < pg_snapshot_xmin(pg_current_snapshot())").format(
            column=Identifier(TX_COLUMN)
        )
        self._safe_head_statement = SQL(
            "SELECT (SELECT max({column}) FROM {schema}.{table} WHERE {safe})::text::bigint "
            "AS tx, (SELECT notification_id FROM {schema}.{table} WHERE {safe} "
            "ORDER BY notification_id DESC LIMIT 1) AS position"
        ).format(schema=schema, table=table, column=Identifier(TX_COLUMN), safe=safe)
        self._ids_ahead_statement = SQL(
            "SELECT max({column})::text::bigint AS newest, "
            "pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS next, "
            "max({column}) >= pg_snapshot_xmax(pg_current_snapshot()) AS ahead "
            "FROM {schema}.{table}"
        ).format(schema=schema, table=table, column=Identifier(TX_COLUMN))
        self._oldest_transaction_statement = SQL(
            "SELECT extract(epoch FROM clock_timestamp() - least("
            "(SELECT min(xact_start) FROM pg_stat_activity WHERE backend_xid IS NOT NULL), "
            "(SELECT min(prepared) FROM pg_prepared_xacts)))::float8 AS age"
        )
        self._last_committed_statement = SQL(
            "SELECT {column}::text::bigint AS tx, notification_id AS position "
            "FROM {schema}.{table} ORDER BY {column} DESC, notification_id DESC LIMIT 1"
        ).format(schema=schema, table=table, column=Identifier(TX_COLUMN))
        self._checkpoint_at_statement = SQL(
            "SELECT {column}::text::bigint AS tx FROM {schema}.{table} WHERE notification_id = %s"
        ).format(schema=schema, table=table, column=Identifier(TX_COLUMN))
        self._notifier = _Notifier(self)
        # Set once per connection (a session setting): not a statement in every append.
        self._statement_timeout = SQL("SET statement_timeout = {timeout}").format(
            timeout=Literal(WRITE_STATEMENT_TIMEOUT)
        )
        self._timed: weakref.WeakSet[Any] = weakref.WeakSet()
        id_type = Identifier(self.datastore.originator_id_type)
        # The events as rows of a VALUES list, one row of parameters each, completed per save
        # by _insert_statement: psycopg sends scalars for about half the CPU of arrays.
        insert_events = SQL(
            "INSERT INTO {schema}.{table} "
            "(originator_id, originator_version, topic, state, {column}) VALUES "
        ).format(schema=schema, table=table, column=Identifier(CHAIN_COLUMN))
        # New customers' data keys and the command's idempotency key go in the same
        # statement as the events: no round trip of their own. Their INSERTs are WITH queries
        # nothing reads, so they run after the events' INSERT: the transaction takes its id
        # there, as with neither. Each combination's head is rendered once (composing a
        # statement costs about as much as sending it); a save adds only its rows.
        command_key_query = SQL(
            "command_key AS (INSERT INTO {schema}.{keys} "
            "(key, fingerprint, order_id, order_version) VALUES (%s, %s, %s, %s))"
        ).format(schema=schema, keys=Identifier(IDEMPOTENCY_TABLE))
        data_keys_query = SQL(
            "data_keys AS (INSERT INTO {schema}.{keys} "
            "(key_id, customer_id, wrapped_key, master_key_id, created_at) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::bytea[], %s::text[], "
            "%s::timestamptz[]))"
        ).format(schema=schema, keys=Identifier(DATA_KEYS_TABLE))
        self._insert_statements: dict[tuple[bool, bool], str] = {}
        for command_key in (False, True):
            for data_keys in (False, True):
                queries = [
                    query
                    for query, wanted in (
                        (command_key_query, command_key),
                        (data_keys_query, data_keys),
                    )
                    if wanted
                ]
                statement = (
                    SQL("WITH {queries} {insert}").format(
                        queries=SQL(", ").join(queries), insert=insert_events
                    )
                    if queries
                    else insert_events
                )
                self._insert_statements[command_key, data_keys] = statement.as_string(None)
        self._command_key_statement = (
            SQL("SELECT fingerprint, order_id, order_version FROM {schema}.{keys} WHERE key = %s")
            .format(schema=schema, keys=Identifier(IDEMPOTENCY_TABLE))
            .as_string(None)
        )
        # Created with the keys earlier versions stored as events, in one statement (under
        # the schema's advisory lock, see create_table): never half there.
        self.sql_create_statements.append(
            SQL(
                "DO $do$ BEGIN IF to_regclass({qualified}) IS NULL THEN "
                "CREATE TABLE {schema}.{keys} (key text PRIMARY KEY, fingerprint text NOT NULL, "
                "order_id {id_type} NOT NULL, order_version bigint NOT NULL); "
                "INSERT INTO {schema}.{keys} SELECT j->>'key', j->>'fingerprint', "
                "(j->'order_id'->>'_data_')::{id_type}, (j->>'order_version')::bigint "
                "FROM (SELECT convert_from(state, 'UTF8')::jsonb AS j FROM {schema}.{table} "
                "WHERE topic = {topic}) AS legacy; "
                "END IF; END $do$"
            ).format(
                qualified=Literal(f"{self.datastore.schema}.{IDEMPOTENCY_TABLE}"),
                schema=schema,
                keys=Identifier(IDEMPOTENCY_TABLE),
                id_type=id_type,
                table=table,
                topic=Literal(LEGACY_RECORD_TOPIC),
            )
        )
        self._previous_hash_statement = (
            SQL(
                "SELECT {column} FROM {schema}.{table} "
                "WHERE originator_id = %s AND originator_version = %s"
            )
            .format(schema=schema, table=table, column=Identifier(CHAIN_COLUMN))
            .as_string(None)
        )
        self._select_aggregate_statement = SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state, {column}, "
            "{tx}::text::bigint AS tx FROM {schema}.{table} "
            "WHERE originator_id = %s AND originator_version <= %s ORDER BY originator_version"
        ).format(
            schema=schema, table=table, column=Identifier(CHAIN_COLUMN), tx=Identifier(TX_COLUMN)
        )

    def _added_column(self, column: str, definition: Composable) -> Composed:
        """Add a column to a table made by an older version, its rows given the definition's
        default. Looked up first: ALTER TABLE takes its exclusive lock even when the column
        exists."""
        return SQL(
            "DO $do$ BEGIN IF NOT EXISTS (SELECT 1 FROM information_schema.columns "
            "WHERE table_schema = {schema_name} AND table_name = {table_name} "
            "AND column_name = {column_name}) THEN "
            "ALTER TABLE {schema}.{table} ADD COLUMN {column} {definition}; END IF; END $do$"
        ).format(
            definition=definition,
            schema_name=Literal(self.datastore.schema),
            table_name=Literal(self.events_table_name),
            column_name=Literal(column),
            schema=Identifier(self.datastore.schema),
            table=Identifier(self.events_table_name),
            column=Identifier(column),
        )

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """One statement, committed on its own: the INSERT and its positions; then a NOTIFY.

        The pool's connections are in autocommit mode, so the statement is its own
        transaction: no BEGIN or COMMIT round trip (about 40% more commits per second with
        8 writers on this shape). Retried as the library retries a lost connection (the
        ledger recognises its own events when the retry meets them). NOTIFY inside the
        transaction would queue every commit on one global lock. A save too big for one
        statement's parameters is several statements in one transaction.
        """
        if not stored_events:
            return []
        parts = [
            stored_events[start : start + MAX_EVENTS_PER_STATEMENT]
            for start in range(0, len(stored_events), MAX_EVENTS_PER_STATEMENT)
        ]
        positions: list[int] = []
        with self.datastore.get_connection() as conn:
            if conn not in self._timed:
                conn.execute(self._statement_timeout)
                self._timed.add(conn)
            with conn.transaction() if len(parts) > 1 else nullcontext(), conn.cursor() as curs:
                for number, part in enumerate(parts):
                    self._insert_stored_events(curs, part, **(kwargs if number == 0 else {}))
                    positions += [row["notification_id"] for row in curs.fetchall()]
        self._notifier.notify()
        return positions

    def _insert_stored_events(
        self,
        curs: Any,
        stored_events: Sequence[StoredEvent],
        *,
        data_keys: Sequence[dict[str, Any]] = (),
        command_key: CommandKey | None = None,
        **_: Any,
    ) -> None:
        """One INSERT of the events with each one's link, without the library's table lock,
        of the data keys of new customers they were sealed with, and of the command's key.

        The links' reads of earlier events run before it, as statements of their own: an
        order's previous event committed before the order was loaded, and rows never change.
        The INSERT is the transaction's only statement, so it takes its id there, and an
        order's next event always has a higher transaction id than its previous one.
        """

        def previous(originator_id: UUID | str, version: int) -> bytes | None:
            curs.execute(self._previous_hash_statement, (originator_id, version), prepare=True)
            row = curs.fetchone()
            return None if row is None or row[CHAIN_COLUMN] is None else bytes(row[CHAIN_COLUMN])

        hashes = self.links(stored_events, previous)
        parameters: list[Any] = []
        if command_key is not None:
            parameters += [
                command_key.key,
                command_key.fingerprint,
                command_key.order_id,
                command_key.order_version,
            ]
        parameters += [
            [row[column] for row in data_keys]
            for column in ("key_id", "customer_id", "wrapped_key", "master_key_id", "created_at")
            if data_keys
        ]
        for stored, link in zip(stored_events, hashes, strict=True):
            parameters += [
                stored.originator_id,
                stored.originator_version,
                stored.topic,
                stored.state,
                link,
            ]
        curs.execute(
            self._insert_statement(command_key is not None, bool(data_keys), len(stored_events)),
            parameters,
        )

    def _insert_statement(self, command_key: bool, data_keys: bool, events: int) -> str:
        """The append statement for ``events`` events; psycopg prepares it once a connection
        has run it a few times."""
        rows = ", ".join(repeat(_EVENT_ROW, events))
        return f"{self._insert_statements[command_key, data_keys]}{rows} RETURNING notification_id"

    def command_key(self, key: str) -> CommandKey | None:
        """The key's first outcome, if a command was recorded with it."""
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._command_key_statement, (key,), prepare=True)
            row = curs.fetchone()
        if row is None:
            return None
        order_id = row["order_id"]
        return CommandKey(
            key,
            row["fingerprint"],
            order_id if isinstance(order_id, UUID) else UUID(order_id),
            row["order_version"],
        )

    def create_table(self) -> None:
        """Create the schema under an advisory lock, so processes starting together take turns.

        Run concurrently, the library's statements deadlock (CREATE TRIGGER against CREATE
        OR REPLACE FUNCTION) or collide on the catalogs' unique indexes.
        """
        lock_key = zlib.crc32(f"{self.datastore.schema}.{self.events_table_name}".encode())
        with self.datastore.get_connection() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (lock_key,))
            try:
                if self.datastore.schema != "public":
                    conn.execute(create_schema_statement(self.datastore.schema))
                super().create_table()
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key,))
        self._refuse_ids_from_another_cluster()

    def _refuse_ids_from_another_cluster(self) -> None:
        """Refuse a store whose rows carry transaction ids this cluster has not reached.

        A logical restore (pg_dump) into another cluster keeps the rows' ids; new events would
        get lower ones and readers past the restored rows would skip them.
        """
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._ids_ahead_statement)
            row = curs.fetchone()
        if row is not None and row["ahead"]:
            raise StoreFromAnotherClusterError(
                f"the events table {self.datastore.schema}.{self.events_table_name} holds "
                f"transaction ids up to {row['newest']}, ahead of this PostgreSQL cluster's "
                f"next id {row['next']}: it was restored from another cluster with pg_dump. "
                "Readers would skip new events, so nothing is written. Restore from a physical "
                "backup (pg_basebackup, PITR), a replica or pg_upgrade, which keep the ids."
            )

    def safe_head(self) -> Checkpoint:
        """The newest event no reader can be overtaken after: of the rows written by
        transactions older than every transaction still running, the highest transaction id
        and the highest position. Every row after it in read order is yet to commit or comes
        from a transaction still running."""
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._safe_head_statement, prepare=True)
            row = curs.fetchone()
        assert row is not None
        return Checkpoint(row["tx"] or 0, row["position"] or 0)

    def last_committed(self) -> Checkpoint:
        """The last committed event in read order: a reader there has passed every event
        committed so far. It may be beyond the safe head (a transaction that began before it
        is still running), and readers get there once that transaction ends."""
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._last_committed_statement, prepare=True)
            row = curs.fetchone()
        return START if row is None else Checkpoint(row["tx"], row["position"])

    def snapshot(self) -> Snapshot | None:
        """Which transactions have ended now (the events of those still running may come
        before the safe head's successors in read order, yet commit later)."""
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute("SELECT pg_current_snapshot()::text AS snapshot")
            row = curs.fetchone()
        assert row is not None
        return Snapshot.parse(row["snapshot"])

    def oldest_transaction_age(self) -> float:
        """Seconds since the oldest transaction still running in the cluster began (0 for
        none): readers wait at the events after its start. Prepared transactions count; other
        roles' sessions only where this role may see them (``pg_read_all_stats``)."""
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._oldest_transaction_statement, prepare=True)
            row = curs.fetchone()
        return 0.0 if row is None or row["age"] is None else max(0.0, float(row["age"]))

    def checkpoint_at(self, position: int) -> Checkpoint | None:
        """Where the event at ``position`` sits in read order (None if no committed event is
        there: a gap, or not yet committed)."""
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._checkpoint_at_statement, (position,), prepare=True)
            row = curs.fetchone()
        return None if row is None else Checkpoint(row["tx"], position)

    def notify(self) -> None:
        """Wake the store's listeners (soon, coalesced with other commits of this process)."""
        self._notifier.notify()

    def select_aggregate_notifications(
        self, originator_id: UUID, *, lte_version: int | None = None
    ) -> Sequence[ChainedNotification]:
        limit = lte_version if lte_version is not None else 2**62
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(self._select_aggregate_statement, (originator_id, limit), prepare=True)
            return [
                ChainedNotification(
                    id=row["notification_id"],
                    originator_id=row["originator_id"],
                    originator_version=row["originator_version"],
                    topic=row["topic"],
                    state=bytes(row["state"]),
                    chain_hash=None if row[CHAIN_COLUMN] is None else bytes(row[CHAIN_COLUMN]),
                    tx=row["tx"],
                )
                for row in curs.fetchall()
            ]


class _Notifier:
    """NOTIFYs the store's channel after commits: at most one per ``NOTIFY_INTERVAL``, from a
    thread of its own, so no command waits for it. Readers poll as well, so a lost
    notification only delays them."""

    IDLE_EXIT = 5.0
    """The thread ends after this many seconds without a commit, and starts again with one."""

    def __init__(self, recorder: PostgresApplicationRecorder) -> None:
        self._recorder = recorder
        self._statement = SQL("NOTIFY {channel}").format(channel=Identifier(recorder.channel_name))
        self._wanted = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def notify(self) -> None:
        self._wanted.set()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="orderledger-notify", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while self._wanted.wait(self.IDLE_EXIT):
            self._wanted.clear()
            try:
                with self._recorder.datastore.get_connection() as conn:
                    conn.execute(self._statement)
            except Exception:  # noqa: S112 - readers poll; the next commit notifies again
                continue
            time.sleep(NOTIFY_INTERVAL)
        with self._lock:
            if self._wanted.is_set():  # a commit came in as we were leaving
                self._thread = threading.Thread(
                    target=self._run, name="orderledger-notify", daemon=True
                )
                self._thread.start()
            else:
                self._thread = None


def _hex(originator_id: UUID | str) -> str:
    return originator_id.hex if isinstance(originator_id, UUID) else originator_id


def postgres_schema(database_url: str) -> str:
    """The schema a ``postgresql://...?schema=name`` URL names (``public`` when it names none).

    Every table of the store lives there: events, read models, keys and effects.
    """
    names = parse_qs(urlsplit(database_url).query).get("schema", ["public"])
    schema = names[-1]
    if len(names) != 1 or not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(
            f"schema {schema!r} in the database URL must be one lower-case name of letters, "
            "digits and underscores (at most 63), e.g. ?schema=ledger"
        )
    return schema


def create_schema_statement(schema: str) -> str:
    """Create the schema if it is missing; safe when several processes start at once."""
    return (
        f'DO $do$ BEGIN CREATE SCHEMA IF NOT EXISTS "{schema}"; '
        "EXCEPTION WHEN duplicate_schema OR unique_violation THEN NULL; END $do$"
    )


def event_store_env(database_url: str) -> dict[str, str]:
    """Translate a database URL into the library's environment for our recorders.

    ``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db`` (parent directories
    are created); ``postgresql://user:password@host:port/dbname?schema=name``.
    """
    parts = urlsplit(database_url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme == "sqlite":
        path = unquote(database_url.split(":///", 1)[1]) if ":///" in database_url else ""
        if not path or path == ":memory:":
            raise ValueError(
                "the SQLite store needs a file path, e.g. sqlite:///var/orderledger.db"
            )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": path,
            "SQLITE_LOCK_TIMEOUT": "30",
            "APPLICATION_RECORDER_TOPIC": f"{__name__}:SQLiteEventRecorder",
            "CREATE_TABLE": "y",
        }
    if scheme in ("postgresql", "postgres"):
        dbname = unquote(parts.path.lstrip("/"))
        if not dbname:
            raise ValueError("the PostgreSQL URL needs a database name, e.g. postgresql://host/db")
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": dbname,
            "POSTGRES_HOST": parts.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(parts.port or 5432),
            "POSTGRES_USER": unquote(parts.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(parts.password or ""),
            "POSTGRES_SCHEMA": postgres_schema(database_url),
            # Few idle connections per process: many processes share one server.
            "POSTGRES_POOL_SIZE": "2",
            "POSTGRES_MAX_OVERFLOW": "10",
            "POSTGRES_CONNECT_TIMEOUT": "5",
            "POSTGRES_LOCK_TIMEOUT": "30",
            "APPLICATION_RECORDER_TOPIC": f"{__name__}:PostgresEventRecorder",
            "CREATE_TABLE": "y",
        }
        return env
    raise ValueError(
        f"unsupported database URL scheme {parts.scheme!r}: use sqlite:/// or postgresql://"
    )
