"""Rows of a read-model table held in memory for one batch: loaded once, written once."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import Connection, Insert, Select, Table, Update, bindparam, insert, select, update

CHUNK = 500
"""Keys per IN (...) query."""

BIGINT = 2**63


class KeyedRows:
    """Rows of one table keyed by primary key: loaded once, written with two executemany."""

    def __init__(self, table: Table, key: tuple[str, ...]) -> None:
        self.table = table
        self.key = key
        self.rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.existing: set[tuple[Any, ...]] = set()
        self.dirty: set[tuple[Any, ...]] = set()

    def load(self, conn: Connection, column: str, values: Iterable[Any]) -> None:
        wanted = sorted(set(values))
        for start in range(0, len(wanted), CHUNK):
            chunk = wanted[start : start + CHUNK]
            for row in conn.execute(rows_with(self.table, column), {"values": chunk}):
                values_ = dict(row._mapping)
                key = tuple(values_[k] for k in self.key)
                self.rows[key] = values_
                self.existing.add(key)

    def get(self, key: tuple[Any, ...]) -> dict[str, Any] | None:
        return self.rows.get(key)

    def add(self, row: dict[str, Any]) -> None:
        key = tuple(row[k] for k in self.key)
        self.rows[key] = row
        self.dirty.add(key)

    def changed(self, key: tuple[Any, ...]) -> None:
        self.dirty.add(key)

    def flush(self, conn: Connection) -> None:
        keys = sorted(self.dirty)
        new = [self.rows[k] for k in keys if k not in self.existing]
        old = [self.rows[k] for k in keys if k in self.existing]
        writes = _writes(self.table, self.key)
        if new:
            conn.execute(writes.insert, new)
        columns = writes.columns
        if old and columns:
            conn.execute(
                writes.update,
                [
                    {**{f"k_{k}": row[k] for k in self.key}, **{f"v_{c}": row[c] for c in columns}}
                    for row in old
                ],
            )


@dataclass(frozen=True)
class _Writes:
    insert: Insert
    update: Update
    columns: list[str]


_writes_by_table: WeakKeyDictionary[Table, dict[tuple[str, ...], _Writes]] = WeakKeyDictionary()


def _writes(table: Table, key: tuple[str, ...]) -> _Writes:
    """The INSERT and the UPDATE by key that ``KeyedRows.flush`` runs, built once per table."""
    by_key = _writes_by_table.get(table)
    if by_key is None:
        by_key = _writes_by_table[table] = {}
    writes = by_key.get(key)
    if writes is None:
        columns = [c.name for c in table.columns if c.name not in key]
        writes = by_key[key] = _Writes(
            insert=insert(table),
            update=update(table)
            .where(*(table.c[k] == bindparam(f"k_{k}") for k in key))
            .values({c: bindparam(f"v_{c}") for c in columns}),
            columns=columns,
        )
    return writes


_queries: WeakKeyDictionary[Table, dict[str, Select[Any]]] = WeakKeyDictionary()


def rows_with(table: Table, column: str) -> Select[Any]:
    """``SELECT * FROM table WHERE column IN :values`` (a list), built once per table.

    Building the statement and its cache key anew cost about as much as running it.
    """
    by_column = _queries.get(table)
    if by_column is None:
        by_column = _queries[table] = {}
    query = by_column.get(column)
    if query is None:
        query = by_column[column] = select(table).where(
            table.c[column].in_(bindparam("values", expanding=True))
        )
    return query


def add_amounts(a: int, b: int) -> int:
    """Add, refusing a figure the 64-bit column cannot hold (so the failing event is named)."""
    total = a + b
    if not -BIGINT <= total < BIGINT:
        raise OverflowError(f"{total} does not fit a 64-bit amount")
    return total
