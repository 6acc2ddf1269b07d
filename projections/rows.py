"""Rows of a read-model table held in memory for one batch: loaded once, written once."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Table, bindparam, insert, select, update

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
            for row in conn.execute(select(self.table).where(self.table.c[column].in_(chunk))):
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
        if new:
            conn.execute(insert(self.table), new)
        columns = [c.name for c in self.table.columns if c.name not in self.key]
        if old and columns:
            statement = (
                update(self.table)
                .where(*(self.table.c[k] == bindparam(f"k_{k}") for k in self.key))
                .values({c: bindparam(f"v_{c}") for c in columns})
            )
            conn.execute(
                statement,
                [
                    {**{f"k_{k}": row[k] for k in self.key}, **{f"v_{c}": row[c] for c in columns}}
                    for row in old
                ],
            )


def add_amounts(a: int, b: int) -> int:
    """Add, refusing a figure the 64-bit column cannot hold (so the failing event is named)."""
    total = a + b
    if not -BIGINT <= total < BIGINT:
        raise OverflowError(f"{total} does not fit a 64-bit amount")
    return total
