"""Creating the store's tables while other processes may be starting on it too."""

from __future__ import annotations

from sqlalchemy import Connection, text

SCHEMA_LOCK = "orderledger.schema."
"""The advisory lock's name, followed by the store's schema (stores in other schemas of the
same database do not wait for each other)."""


def changing_schema_alone(conn: Connection) -> None:
    """Make the caller's write transaction the only one creating or altering tables until it
    ends, so it finds what an earlier one created instead of racing it.

    On PostgreSQL a transaction-level advisory lock; on SQLite a write transaction (``BEGIN
    IMMEDIATE``) already is the only writer.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key || current_schema()))"),
            {"key": SCHEMA_LOCK},
        )
