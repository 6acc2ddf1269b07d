"""The events table reached around the ledger, through the driver itself: to check what is
stored, and to change it as an attacker with the database owner's rights would."""

from __future__ import annotations

import sqlite3
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

    def as_owner(self, *statements: str) -> None:
        """Drop the immutability triggers, then run the statements: what the owner can do."""
        if self.is_sqlite:
            drops = [f"DROP TRIGGER IF EXISTS {name}" for name in self.trigger_names()]
            conn = sqlite3.connect(event_store_env(self.url)["SQLITE_DBNAME"])
            try:
                for statement in (*drops, *statements):
                    conn.execute(statement)
                conn.commit()
            finally:
                conn.close()
            return
        drops = [f"DROP TRIGGER IF EXISTS {name} ON {self.table}" for name in self.trigger_names()]
        with psycopg.connect(self.url) as pg:
            for statement in (*drops, *statements):
                pg.execute(statement)
