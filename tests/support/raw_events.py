"""The store reached around the ledger, through the driver itself: to check what is stored,
and to change it as an attacker with the database owner's rights would."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from domain.eventstore import event_store_env


class RawEvents:
    """The events table reached around the ledger, through the driver itself."""

    def __init__(self, url: str, table: str) -> None:
        self.url = url
        self.table = table
        self.is_sqlite = url.startswith("sqlite")

    def rows(self) -> list[tuple[Any, ...]]:
        position = "rowid" if self.is_sqlite else "notification_id"
        return self._query(
            f"SELECT {position}, originator_id, originator_version, topic, state "
            f"FROM {self.table} ORDER BY {position}"
        )

    def trigger_names(self) -> set[str]:
        if self.is_sqlite:
            statement = (
                "SELECT name FROM sqlite_master "
                f"WHERE type = 'trigger' AND tbl_name = '{self.table}'"
            )
        else:
            statement = (
                "SELECT tgname FROM pg_trigger "
                f"WHERE tgrelid = '{self.table}'::regclass AND NOT tgisinternal"
            )
        return {row[0] for row in self._query(statement)}

    def error_from(self, statement: str) -> str:
        """Run a statement that must fail and return the database's message."""
        if self.is_sqlite:
            conn = sqlite3.connect(event_store_env(self.url)["SQLITE_DBNAME"])
            try:
                conn.execute(statement)
                conn.commit()
            except sqlite3.DatabaseError as error:
                return str(error)
            finally:
                conn.close()
        else:
            with psycopg.connect(self.url, autocommit=True) as pg:
                try:
                    pg.execute(statement)
                except psycopg.DatabaseError as error:
                    return str(error)
        pytest.fail(f"the database accepted {statement!r}")

    def _query(self, statement: str) -> list[tuple[Any, ...]]:
        if self.is_sqlite:
            conn = sqlite3.connect(event_store_env(self.url)["SQLITE_DBNAME"])
            try:
                return [tuple(row) for row in conn.execute(statement).fetchall()]
            finally:
                conn.close()
        with psycopg.connect(self.url) as pg:
            return [tuple(row) for row in pg.execute(statement).fetchall()]

    @property
    def position(self) -> str:
        return "rowid" if self.is_sqlite else "notification_id"

    def as_owner(self, *statements: str | tuple[str, tuple[Any, ...]]) -> None:
        """Drop the immutability triggers, then run the statements: what the owner can do.

        A statement may come with parameters, written ``{p}`` in it for either driver.
        """
        marker = "?" if self.is_sqlite else "%s"
        steps = [
            (s.replace("{p}", marker), ())
            if isinstance(s, str)
            else (s[0].replace("{p}", marker), s[1])
            for s in statements
        ]
        if self.is_sqlite:
            drops = [f"DROP TRIGGER IF EXISTS {name}" for name in self.trigger_names()]
            conn = sqlite3.connect(event_store_env(self.url)["SQLITE_DBNAME"])
            try:
                for statement, params in [*((d, ()) for d in drops), *steps]:
                    conn.execute(statement, params)
                conn.commit()
            finally:
                conn.close()
            return
        drops = [f"DROP TRIGGER IF EXISTS {name} ON {self.table}" for name in self.trigger_names()]
        with psycopg.connect(self.url) as pg:
            for statement, params in [*((d, ()) for d in drops), *steps]:
                pg.execute(statement, params)

    def state_at(self, position: int) -> bytes:
        rows = self._query(
            f"SELECT state FROM {self.table} WHERE {self.position} = {int(position)}"
        )
        return bytes(rows[0][0])

    def rewrite_state(self, position: int, old: bytes, new: bytes) -> None:
        """Replace bytes in the stored state of the event at ``position``, hash untouched."""
        state = self.state_at(position)
        assert old in state, f"{old!r} is not in the event at position {position}"
        self.as_owner(
            (
                f"UPDATE {self.table} SET state = {{p}} WHERE {self.position} = {{p}}",
                (state.replace(old, new), position),
            )
        )

    def delete(self, *positions: int) -> None:
        listed = ", ".join(str(int(p)) for p in positions)
        self.as_owner(f"DELETE FROM {self.table} WHERE {self.position} IN ({listed})")

    def swap_positions(
        self, first: int, second: int, *, table: str | None = None, column: str | None = None
    ) -> None:
        """Exchange two events' positions (moving them in the global sequence); in another
        table keyed by position, such as the audit log, with ``table`` and ``column``."""
        column, table, spare = column or self.position, table or self.table, -1
        self.as_owner(
            f"UPDATE {table} SET {column} = {spare} WHERE {column} = {int(first)}",
            f"UPDATE {table} SET {column} = {int(first)} WHERE {column} = {int(second)}",
            f"UPDATE {table} SET {column} = {int(second)} WHERE {column} = {spare}",
        )


def values_held(url: str, values: Sequence[str]) -> list[str]:
    """Which of the values appear anywhere in the database: on SQLite in any byte of its file
    and WAL, on PostgreSQL in any column of any table of the current schema."""
    if url.startswith("sqlite"):
        database = Path(event_store_env(url)["SQLITE_DBNAME"])
        files = [database, database.with_name(database.name + "-wal")]
        written = b"".join(path.read_bytes() for path in files if path.exists())
        return [value for value in values if value.encode() in written]
    found = []
    with psycopg.connect(url, autocommit=True) as pg:
        columns = pg.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema()"
        ).fetchall()
        for value in values:
            for table, column, data_type in columns:
                if data_type == "bytea":
                    condition = f'position(%(value)s::bytea IN "{column}") > 0'
                else:
                    condition = f"\"{column}\"::text LIKE '%%' || %(value)s || '%%'"
                query = f'SELECT 1 FROM "{table}" WHERE {condition} LIMIT 1'
                if pg.execute(query, {"value": value}).fetchone() is not None:  # type: ignore[arg-type]
                    found.append(value)
                    break
    return found
