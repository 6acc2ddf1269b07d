"""SQLAlchemy engines for read models, in the store's database by default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.expression import literal_column
from sqlalchemy.types import Float

WRITE = {"orderledger_write": True}
"""Execution options for a write transaction (``BEGIN IMMEDIATE`` on SQLite)."""


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
        return create_engine(
            url.set(drivername="postgresql+psycopg"),
            pool_size=8,
            max_overflow=8,
            pool_pre_ping=True,
        )
    raise ValueError(f"unsupported database URL for read models: {database_url!r}")


def _configure_sqlite(dbapi_connection: Any, _record: object) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite would defer it otherwise).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    # WAL with synchronous=NORMAL survives a killed process; only power loss can drop the tail.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _begin_sqlite(connection: Connection) -> None:
    if connection.get_execution_options().get("orderledger_write"):
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        connection.exec_driver_sql("BEGIN")


def db_now(dialect_name: str) -> ColumnElement[float]:
    """The database clock in epoch seconds: one clock for every worker on every machine."""
    if dialect_name == "sqlite":
        return literal_column("((julianday('now') - 2440587.5) * 86400.0)", Float)
    return literal_column("extract(epoch from clock_timestamp())::float8", Float)
