"""SQLAlchemy engines for read models, in the store's database by default."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import (
    Column,
    Connection,
    Dialect,
    Engine,
    Table,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.schema import CreateColumn
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.expression import literal_column
from sqlalchemy.types import Float

from domain.eventstore import create_schema_statement, postgres_schema
from domain.schema import changing_schema_alone
from domain.sqlite_writes import SQLiteWriteLock, sqlite_write_lock

WRITE = {"orderledger_write": True}
"""Execution options for a write transaction (``BEGIN IMMEDIATE`` on SQLite)."""

WAL_AUTOCHECKPOINT_PAGES = 10_000
"""Pages of WAL (4 KB each) after which a committing read-model connection checkpoints."""

BATCH_WRITE = {**WRITE, "orderledger_batch": True}
"""A projection batch: its rows and its position are one transaction, so on PostgreSQL it may
commit without waiting for the disk. A server crash can lose the last batches, but always the
rows together with the position that covers them, and the worker applies them again."""


def read_model_engine(database_url: str) -> Engine:
    """An engine on the same database as the event store.

    On SQLite, write transactions take the write lock up front (``BEGIN IMMEDIATE``) so two
    writers queue on the busy timeout instead of failing to upgrade a read lock; reads stay
    deferred so they never block writers (WAL).
    """
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database:
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url.set(drivername="sqlite+pysqlite"), pool_size=8, max_overflow=8)
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_sqlite)
        return engine
    if url.get_backend_name() == "postgresql":
        # The store's schema first on every connection's search path (the point reader's own
        # connections take the same URL): our unqualified read-model tables live there.
        schema = postgres_schema(database_url)
        query = {k: v for k, v in url.query.items() if k != "schema"}
        url = url.set(query={**query, "options": f"-csearch_path={schema}"})
        engine = create_engine(
            url.set(drivername="postgresql+psycopg"),
            pool_size=8,
            max_overflow=8,
            pool_pre_ping=True,
        )
        event.listen(engine, "begin", _begin_postgres)
        if schema != "public":
            with engine.begin() as conn:
                conn.exec_driver_sql(create_schema_statement(schema))
        return engine
    raise ValueError(f"unsupported database URL for read models: {database_url!r}")


@contextmanager
def write_transaction(engine: Engine, options: Mapping[str, bool] = WRITE) -> Iterator[Connection]:
    """A write transaction on ``engine``, committed when the body returns.

    On SQLite it begins with ``BEGIN IMMEDIATE`` and holds the file's write lock (see
    ``domain.sqlite_writes``) from before the connection is taken until it is back in the
    pool, so writers queue there and each starts the moment the one before it commits.
    """
    with (
        _write_lock(engine),
        engine.connect().execution_options(**options) as conn,
        conn.begin(),
    ):
        yield conn


def install_schema(engine: Engine, install: Callable[[Connection], None]) -> None:
    """Run ``install`` (create tables if missing, add columns an older version lacks) in one
    write transaction, alone: idempotent, and safe when several processes start at once."""
    with write_transaction(engine) as conn:
        changing_schema_alone(conn)
        install(conn)


_engine_locks: WeakKeyDictionary[Engine, SQLiteWriteLock | None] = WeakKeyDictionary()
"""Each engine's write lock (None off SQLite), looked up once: finding it resolves the path."""


def _write_lock(engine: Engine) -> AbstractContextManager[None]:
    try:
        lock = _engine_locks[engine]
    except KeyError:
        sqlite_file = engine.dialect.name == "sqlite" and engine.url.database
        lock = _engine_locks[engine] = sqlite_write_lock(sqlite_file) if sqlite_file else None
    return nullcontext() if lock is None else lock.hold()


def _configure_sqlite(dbapi_connection: Any, _record: object) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite would defer it otherwise).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    # WAL with synchronous=NORMAL survives a killed process; only power loss can drop the tail.
    cursor.execute("PRAGMA synchronous=NORMAL")
    # Checkpoint (copy the WAL into the database file, with an fsync) every 40 MB of WAL rather
    # than every 4 MB: a catch-up writing many batches syncs a tenth as often.
    cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    cursor.close()


def _begin_postgres(connection: Connection) -> None:
    if connection.get_execution_options().get("orderledger_batch"):
        connection.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")


def _begin_sqlite(connection: Connection) -> None:
    if connection.get_execution_options().get("orderledger_write"):
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        connection.exec_driver_sql("BEGIN")


def add_missing_columns(conn: Connection, table: Table) -> None:
    """In the caller's transaction, add the columns a table made by an older version lacks,
    each filled with its server default."""
    present = {column["name"] for column in inspect(conn).get_columns(table.name)}
    name = conn.dialect.identifier_preparer.format_table(table)
    for column in table.columns:
        if column.name not in present:
            ddl = CreateColumn(column).compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE {name} ADD COLUMN {ddl}"))


def db_now(dialect_name: str) -> ColumnElement[float]:
    """The database clock in epoch seconds: one clock for every worker on every machine."""
    if dialect_name == "sqlite":
        return literal_column("((julianday('now') - 2440587.5) * 86400.0)", Float)
    return literal_column("extract(epoch from clock_timestamp())::float8", Float)


_Plan = tuple[str, list[tuple[str, Callable[[Any], Any] | None]]]
_plans: dict[tuple[str, Table, str | None], _Plan] = {}


def _plan(conn: Connection, table: Table, key: str | None) -> _Plan:
    """The SQL of an INSERT (no key) or an UPDATE by key, and each parameter's converter."""
    dialect = conn.dialect
    cache_key = (dialect.name, table, key)
    plan = _plans.get(cache_key)
    if plan is None:
        # Identifiers come from our own Table and are quoted by the dialect; values are bound.
        quote = dialect.identifier_preparer.quote
        name = dialect.identifier_preparer.format_table(table)
        mark = "?" if dialect.paramstyle in ("qmark", "numeric") else "%s"
        if key is None:
            columns = list(table.columns)
            names = ", ".join(quote(c.name) for c in columns)
            marks = ", ".join([mark] * len(columns))
            statement = f"INSERT INTO {name} ({names}) VALUES ({marks})"  # noqa: S608
        else:
            columns = [c for c in table.columns if c.name != key]
            assignments = ", ".join(f"{quote(c.name)} = {mark}" for c in columns)
            statement = f"UPDATE {name} SET {assignments} WHERE {quote(key)} = {mark}"  # noqa: S608
            columns.append(table.c[key])
        converters: list[tuple[str, Any]] = [(c.name, _bind_processor(c, dialect)) for c in columns]
        plan = _plans[cache_key] = (statement, converters)
    return plan


def _parameters(plan: _Plan, rows: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    converters = plan[1]
    names = [name for name, _ in converters]
    values = itemgetter(*names) if len(names) > 1 else lambda row: (row[names[0]],)
    converted = [(index, convert) for index, (_, convert) in enumerate(converters) if convert]
    if not converted:
        return [values(row) for row in rows]
    parameters = []
    for row in rows:
        row_values = list(values(row))
        for index, convert in converted:
            row_values[index] = convert(row_values[index])
        parameters.append(tuple(row_values))
    return parameters


def _bind_processor(column: Column[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    """The column's bind processor as SQLAlchemy applies it, quicker where known to be equal."""
    impl = column.type.dialect_impl(dialect)
    processor = impl.bind_processor(dialect)
    if (
        processor is not None
        and type(impl) is sqlite.DATETIME
        and impl._storage_format == sqlite.DATETIME._storage_format
    ):
        return partial(_sqlite_datetime, processor)
    return processor


def _sqlite_datetime(convert: Callable[[Any], Any], value: Any) -> Any:
    # "YYYY-MM-DD HH:MM:SS.ffffff", the time zone left out: what the default storage format
    # gives for a datetime, without building its mapping of fields.
    if type(value) is datetime:
        return value.isoformat(" ", "microseconds")[:26]
    return convert(value)


def insert_rows(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """``conn.execute(insert(table), rows)`` for rows with every column, with less overhead.

    One executemany of a plain statement (on PostgreSQL one statement for all rows); each
    value goes through the same bind processor SQLAlchemy would apply, so what is stored is
    the same. Catch-up writes thousands of rows per batch, and SQLAlchemy's per-row
    parameter handling was a tenth of its time.
    """
    _write_rows(conn, table, None, rows)


def update_rows(
    conn: Connection, table: Table, key: str, rows: Sequence[Mapping[str, Any]]
) -> None:
    """Update every other column of each row, found by its ``key`` column, in one go."""
    _write_rows(conn, table, key, rows)


def _write_rows(
    conn: Connection, table: Table, key: str | None, rows: Sequence[Mapping[str, Any]]
) -> None:
    """Insert the rows (``key`` None) or update them by their ``key`` column."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        _postgres_values(conn, table, key, rows)
        return
    plan = _plan(conn, table, key)
    conn.exec_driver_sql(plan[0], _parameters(plan, rows))


def _postgres_values(
    conn: Connection, table: Table, key: str | None, rows: Sequence[Mapping[str, Any]]
) -> None:
    """On PostgreSQL, all rows in one statement: one array per column, ``unnest``-ed.

    An executemany runs one statement per row on the server, even pipelined, and a
    multi-row VALUES list makes the driver parse thousands of placeholders; one array per
    column keeps the statement text fixed (so it is prepared once) and cast to the column
    types, whatever the values look like.
    """
    plan = _plan(conn, table, key)
    dialect = conn.dialect
    quote = dialect.identifier_preparer.quote
    name = dialect.identifier_preparer.format_table(table)
    columns = [table.c[column] for column, _ in plan[1]]
    arrays = ", ".join(f"CAST(%s AS {c.type.compile(dialect)}[])" for c in columns)
    aliases = ", ".join(quote(c.name) for c in columns)
    if key is None:
        statement = f"INSERT INTO {name} ({aliases}) SELECT * FROM unnest({arrays})"  # noqa: S608
    else:
        assignments = ", ".join(
            f"{quote(c.name)} = v.{quote(c.name)}" for c in columns if c.name != key
        )
        statement = (
            f"UPDATE {name} SET {assignments} FROM unnest({arrays}) "  # noqa: S608
            f"AS v({aliases}) WHERE {name}.{quote(key)} = v.{quote(key)}"
        )
    by_column = zip(*_parameters(plan, rows), strict=True)
    conn.exec_driver_sql(statement, tuple(list(values) for values in by_column))
