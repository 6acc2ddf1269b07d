"""Point reads: one row by primary key from a projection's serving generation, in one statement.

``ProjectionRuntime.read`` is the general way in: a pooled connection, a transaction, the
catalog look-up, on PostgreSQL a savepoint and a share lock per table, the query, the commit.
For the read that dominates an order service's traffic (one order by id) that ceremony costs
ten times the query. A point read is one statement on a connection the reader keeps per
thread: it joins the catalog row of the generation it last saw serving to the row asked for,
so within the statement's own snapshot it learns whether that generation still serves, how far
it has applied, and the row. A generation that stopped serving (a rebuild took over) or whose
tables are gone makes the reader look the serving generation up again and try once more.

The statement sees one snapshot on both stores (SQLite in autocommit runs it as one read
transaction; PostgreSQL gives a statement one snapshot), and a switch-over cannot drop a table
under it: SQLite's readers keep their snapshot, and PostgreSQL's DROP TABLE waits for the
statement's own ACCESS SHARE lock.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import ColumnElement, Engine, Select, Table, bindparam, func, literal_column, select
from sqlalchemy.dialects import postgresql

from domain.eventstore import Checkpoint
from projections.engine.catalog import SERVING, Catalog, generations

BATCH_KEYS = 256
"""Most keys one batched PostgreSQL read asks for."""
ASYNC_CONNECTIONS = 4
"""PostgreSQL connections of one reader for ``aget``: one read each at a time."""
LOCK_TIMEOUT_MS = 200
"""How long a PostgreSQL point read waits for a table lock. Only a retired generation's
pending DROP TABLE makes it wait (its readers queue behind the drop): the reader then gives
up, forgets that generation's statement and reads the serving one."""
SQLITE_MMAP_BYTES = 1 << 30
"""How much of a SQLite store a point reader's connection maps into memory (address space;
the pages in use are the operating system's file cache either way)."""


@dataclass(frozen=True)
class PointRead:
    """What a point read saw in one snapshot."""

    checkpoint: Checkpoint
    """The serving generation's checkpoint."""
    row: dict[str, Any] | None
    """The row, with SQLAlchemy's own type conversions applied; None when there is none."""


@dataclass(frozen=True)
class _Statement:
    generation: int
    sql: str
    order: tuple[str, ...] | None
    """Parameter names in order for a positional paramstyle (SQLite), else None (named)."""
    columns: tuple[str, ...]
    convert: tuple[Callable[[Any], Any] | None, ...]
    batch_sql: str
    """The same for many keys at once (``key = ANY(:keys)``), on PostgreSQL; else empty."""

    def parameters(self, key: str, name: str) -> Any:
        values = {"key": key, "name": name, "generation": self.generation}
        return values if self.order is None else tuple(values[n] for n in self.order)


class PointReader:
    """Reads single rows of one table of a projection by its one-column primary key.

    Thread-safe: each thread keeps its own database connection (one per thread that reads).
    """

    def __init__(self, engine: Engine, catalog: Catalog, name: str, table: str) -> None:
        self.engine = engine
        self.catalog = catalog
        self.name = name
        self.table = table
        self._statement: _Statement | None = None
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        self._errors: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._async: _AsyncConnections | None = None
        self._pending: dict[str, list[asyncio.Future[PointRead | None]]] = {}
        self._collecting = False
        """Whether a flush is waiting for a connection, to take the reads asked for meanwhile."""
        self._flushes: set[asyncio.Future[None]] = set()

    def get(self, key: str) -> PointRead | None:
        """The row whose primary key is ``key`` (``row`` None when there is none), or None when
        a point read cannot answer: the projection has no serving generation yet, or the
        serving generation changed under every attempt. Then read the ordinary way."""
        for _ in range(3):
            statement = self._statement or self._prepare()
            if statement is None:
                return None
            try:
                found = self._run(statement, key)
            except self._errors:
                # Its tables were dropped by a switch-over, or the connection broke.
                self._discard_connection()
                found = None
            if found is not None:
                return found
            self._forget(statement)  # that generation no longer serves: look it up again
        return None

    async def aget(self, key: str) -> PointRead | None:
        """``get`` for a caller on an event loop, without a thread hand-off.

        On PostgreSQL, reads asked for while the reader's connections are busy are gathered
        and answered by one statement (``key = ANY(:keys)``), through a few asynchronous
        connections of the reader's own (``ASYNC_CONNECTIONS``, opened on first use on the
        running loop): under load one round trip and one execution serve many requests,
        and no read waits in a thread to win the interpreter lock back from a busy loop.
        SQLite answers from a local file: ``get`` itself.
        """
        if self.engine.dialect.name != "postgresql":
            return self.get(key)
        for _ in range(3):
            future: asyncio.Future[PointRead | None] = asyncio.get_running_loop().create_future()
            self._pending.setdefault(key, []).append(future)
            if not self._collecting:
                self._start_flush()
            found = await future
            if found is not None:
                return found
        return None

    def _start_flush(self) -> None:
        self._collecting = True
        flush = asyncio.ensure_future(self._flush())
        self._flushes.add(flush)  # held until done: the loop keeps only weak references
        flush.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        """Take the reads asked for so far, once a connection is free, and answer them all."""
        pool = self._async_pool()
        try:
            connection = await pool.acquire()
        except BaseException as error:
            self._collecting = False
            self._answer_all(self._take(), error)
            if isinstance(error, asyncio.CancelledError):
                raise
            return
        self._collecting = False
        batch = self._take()
        if self._pending:  # more than one batch holds: the rest wait for the next connection
            self._start_flush()
        statement: _Statement | None = None
        try:
            statement = self._statement or await asyncio.to_thread(self._prepare)
            records: list[Any] = []
            if statement is not None:
                parameters: dict[str, Any] = {
                    "keys": list(batch),
                    "name": self.name,
                    "generation": statement.generation,
                }
                cursor = await connection.execute(statement.batch_sql, parameters, prepare=True)
                records = await cursor.fetchall()
        except BaseException as error:
            pool.discard(connection)  # broken, or left mid-read by a cancellation
            if not isinstance(error, psycopg.Error):
                self._answer_all(batch, error)
                if isinstance(error, asyncio.CancelledError):
                    raise
                return
            if statement is not None:  # its tables were dropped by a switch-over, or it broke
                self._forget(statement)
            self._answer_all(batch, None)
            return
        pool.release(connection)
        self._answer(batch, statement, records)

    def _answer(
        self,
        batch: dict[str, list[asyncio.Future[PointRead | None]]],
        statement: _Statement | None,
        records: list[Any],
    ) -> None:
        """Give each waiting reader its row (or none) from the batch statement's records."""
        if statement is None or not records:
            # No serving generation yet, or that one no longer serves: look it up again.
            if statement is not None:
                self._forget(statement)
            self._answer_all(batch, None)
            return
        found = {
            result.row[statement.columns[0]]: result
            for result in (self._result(statement, record) for record in records)
            if result is not None and result.row is not None
        }
        absent = PointRead(Checkpoint(records[0][0], records[0][1]), None)
        for key, futures in batch.items():
            for future in futures:
                if not future.done():
                    future.set_result(found.get(key, absent))

    def _take(self) -> dict[str, list[asyncio.Future[PointRead | None]]]:
        """Up to ``BATCH_KEYS`` of the keys asked for, with their waiting readers."""
        if len(self._pending) <= BATCH_KEYS:
            batch, self._pending = self._pending, {}
            return batch
        keys = list(self._pending)[:BATCH_KEYS]
        return {key: self._pending.pop(key) for key in keys}

    @staticmethod
    def _answer_all(
        batch: dict[str, list[asyncio.Future[PointRead | None]]],
        outcome: PointRead | BaseException | None,
    ) -> None:
        for futures in batch.values():
            for future in futures:
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        if self._async is not None:
            self._async.close()

    # -- internals ------------------------------------------------------------------------------

    def _run(self, statement: _Statement, key: str) -> PointRead | None:
        cursor = self._connection().cursor()
        try:
            cursor.execute(statement.sql, statement.parameters(key, self.name))
            record = cursor.fetchone()
        finally:
            cursor.close()
        return self._result(statement, record)

    def _async_pool(self) -> _AsyncConnections:
        if self._async is None:
            url = self.engine.url.set(drivername="postgresql")
            self._async = _AsyncConnections(url.render_as_string(hide_password=False))
        return self._async

    @staticmethod
    def _result(statement: _Statement, record: Any) -> PointRead | None:
        """What the statement's one record says; None when the generation no longer serves."""
        if record is None:
            return None
        tx, position, *values = record
        checkpoint = Checkpoint(tx, position)
        if values[0] is None:  # the key column of the outer join: no such row
            return PointRead(checkpoint, None)
        row = {
            column: convert(value) if convert is not None and value is not None else value
            for column, convert, value in zip(
                statement.columns, statement.convert, values, strict=True
            )
        }
        return PointRead(checkpoint, row)

    def _prepare(self) -> _Statement | None:
        serving = self.catalog.serving(self.name)
        if serving is None:
            return None
        table = self.catalog.tables(self.name, serving.generation)[self.table]
        statement = _compile(self.engine, table, serving.generation)
        self._statement = statement
        return statement

    def _forget(self, statement: _Statement) -> None:
        if self._statement is statement:
            self._statement = None

    def _connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            proxied = self.engine.raw_connection()
            proxied.detach()  # kept for this thread's lifetime, outside the pool's count
            connection = proxied.dbapi_connection
            assert connection is not None  # a freshly checked-out connection has one
            if self.engine.dialect.name == "postgresql":
                connection.autocommit = True  # one statement, one snapshot, no open transaction
                connection.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
            else:
                # Pages read straight from the mapped file, not copied in by a system call
                # each: about a quarter off a point read in a 1.7 GB store.
                connection.execute(f"PRAGMA mmap_size = {SQLITE_MMAP_BYTES}")
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _discard_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            return
        self._local.connection = None
        with self._lock:
            if connection in self._connections:
                self._connections.remove(connection)
        connection.close()


class _AsyncConnections:
    """A few autocommit ``psycopg.AsyncConnection`` s, opened on demand on one event loop."""

    def __init__(self, conninfo: str, size: int = ASYNC_CONNECTIONS) -> None:
        self.conninfo = conninfo
        # The URL's own options (the store's search_path) and the lock timeout: an options
        # argument would replace the URL's, not add to them.
        own = conninfo_to_dict(conninfo).get("options") or ""
        self._options = f"{own} -c lock_timeout={LOCK_TIMEOUT_MS}".strip()
        self.size = size
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> psycopg.AsyncConnection[Any]:
        while not self._idle and self._open >= self.size:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        if self._idle:
            return self._idle.pop()
        self._open += 1
        try:
            return await psycopg.AsyncConnection.connect(
                self.conninfo, autocommit=True, options=self._options
            )
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    def release(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self._idle.append(connection)
        self._wake()

    def discard(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self._open -= 1
        self._wake()
        connection.pgconn.finish()

    def close(self) -> None:
        """Close the idle connections (those in use close when their reads end)."""
        idle, self._idle = self._idle, []
        self._open -= len(idle)
        for connection in idle:
            connection.pgconn.finish()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _compile(engine: Engine, table: Table, generation: int) -> _Statement:
    """``SELECT g.tx_id, g.position, t.* FROM catalog g LEFT JOIN table t ON t.key = :key``
    where ``g`` is the generation's catalog row, still serving."""
    dialect = engine.dialect
    (key,) = table.primary_key.columns
    columns = [key, *(c for c in table.columns if c is not key)]

    def rows(matching: ColumnElement[bool]) -> Select[Any]:
        """The serving generation's catalog row joined to the table's rows ``matching``."""
        return (
            select(generations.c.tx_id, generations.c.position, *columns)
            .select_from(generations.outerjoin(table, matching))
            .where(
                generations.c.name == bindparam("name"),
                generations.c.generation == bindparam("generation"),
                generations.c.role == literal_column(f"'{SERVING}'"),
            )
        )

    compiled = rows(key == bindparam("key", type_=key.type)).compile(dialect=dialect)
    convert = tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns)
    batch_sql = ""
    if dialect.name == "postgresql":
        many = key == func.any(bindparam("keys", type_=postgresql.ARRAY(key.type)))
        batch_sql = rows(many).compile(dialect=dialect).string
    return _Statement(
        generation,
        compiled.string,
        tuple(compiled.positiontup) if compiled.positional and compiled.positiontup else None,
        tuple(c.name for c in columns),
        convert,
        batch_sql,
    )
