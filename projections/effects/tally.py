"""How many effects each destination holds in each status, kept by the database as they change.

Counting the outbox reads every row (93 ms for a million effects on PostgreSQL), so the console,
the API, the CLI and the metrics read counts the database keeps instead. Triggers on the effects
table record every insert, change of status and delete:

- on SQLite, one writer at a time, they add to ``outbox_counts`` directly;
- on PostgreSQL they append +n/-n rows to ``outbox_count_changes`` and never update a shared
  row, so writers never wait on each other for a count. ``fold_counts`` moves those changes
  into ``outbox_counts``: each dispatcher folds about once a second, and a read that finds a
  large backlog (no dispatcher ran) folds first.

A read adds both tables in one statement, so it is exact at every moment. A destination is
where an effect goes (see ``projections.effects.outbox.destination_of``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    func,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.dialects.sqlite.base import SQLiteDialect
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import FromClause

from projections.engine.database import write_transaction

Destination = Callable[[FromClause], ColumnElement[str]]
"""The destination of an effect row, as SQL over a table (or an alias: a trigger's rows)."""

_VERSION = 1
"""Part of the triggers' names: a version that counts differently installs new ones."""


tally_metadata = MetaData()

counts = Table(
    "outbox_counts",
    tally_metadata,
    Column("destination", String(2048), primary_key=True),
    Column("status", String(12), primary_key=True),
    Column("n", BigInteger, nullable=False),
)

changes = Table(
    "outbox_count_changes",
    tally_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("destination", String(2048), nullable=False),
    Column("status", String(12), nullable=False),
    Column("n", BigInteger, nullable=False),
)


def install_counts(conn: Connection, effects: Table, destination_of: Destination) -> None:
    """Create the counting triggers on ``effects`` once, starting from the rows it holds now.

    On PostgreSQL the table is locked against writes while the counts start, so no change
    falls between the first count and the triggers.
    """
    tally_metadata.create_all(conn, checkfirst=True)
    postgres = conn.dialect.name == "postgresql"
    if _installed(conn, effects, postgres):
        return
    if postgres:
        conn.execute(text(f"LOCK TABLE {effects.name} IN SHARE ROW EXCLUSIVE MODE"))
        if _installed(conn, effects, postgres):
            return  # another process installed them while we waited
    triggers = _postgres_triggers if postgres else _sqlite_triggers
    for statement in triggers(effects, destination_of):
        conn.execute(text(statement))
    conn.execute(delete(counts))
    conn.execute(delete(changes))
    destination = destination_of(effects).label("destination")
    conn.execute(
        counts.insert().from_select(
            ["destination", "status", "n"],
            select(destination, effects.c.status, func.count()).group_by(
                destination, effects.c.status
            ),
        )
    )


READ_BACKLOG = 10_000
"""A read that finds about this many changes not yet folded folds them first (no dispatcher
has run for a while, or a bulk load just happened), so reads stay fast."""


def read_counts(engine: Engine) -> dict[str, Counter[str]]:
    """Effects per status, per destination: exact, read in one statement."""
    with engine.connect() as conn:
        span = conn.execute(select(func.max(changes.c.id) - func.min(changes.c.id))).scalar()
        if span is not None and int(span) >= READ_BACKLOG:
            fold_counts(engine)
        return _read(conn)


def _read(conn: Connection) -> dict[str, Counter[str]]:
    both = union_all(
        select(counts.c.destination, counts.c.status, counts.c.n),
        select(changes.c.destination, changes.c.status, changes.c.n),
    ).subquery()
    total = func.sum(both.c.n)
    found: dict[str, Counter[str]] = {}
    for row in conn.execute(
        select(both.c.destination, both.c.status, total)
        .group_by(both.c.destination, both.c.status)
        .having(total != 0)
    ):
        found.setdefault(row[0], Counter())[row[1]] = int(row[2])
    return found


def fold_counts(engine: Engine) -> None:
    """Move the changes recorded so far into the counts, in one statement (PostgreSQL; SQLite's
    triggers count directly).

    Several processes may fold at once: folds take turns (the others return), and each moves
    only the changes its statement deletes.
    """
    if engine.dialect.name != "postgresql":
        return
    moved = delete(changes).returning(changes.c.destination, changes.c.status, changes.c.n)
    moved_rows = moved.cte("moved")
    total = func.sum(moved_rows.c.n)
    summed = (
        select(moved_rows.c.destination, moved_rows.c.status, total)
        .group_by(moved_rows.c.destination, moved_rows.c.status)
        .having(total != 0)
        .order_by(moved_rows.c.destination, moved_rows.c.status)
    )
    upsert = postgresql.insert(counts).from_select(["destination", "status", "n"], summed)
    statement = upsert.on_conflict_do_update(
        index_elements=[counts.c.destination, counts.c.status],
        set_={"n": counts.c.n + upsert.excluded.n},
    )
    with write_transaction(engine) as conn:
        if conn.execute(
            text("SELECT pg_try_advisory_xact_lock(hashtext('outbox_counts fold'))")
        ).scalar_one():
            conn.execute(statement)


def _installed(conn: Connection, effects: Table, postgres: bool) -> bool:
    name = _trigger_name(effects, "insert")
    if postgres:
        query = "SELECT 1 FROM pg_trigger WHERE tgname = :name AND tgrelid = to_regclass(:table)"
        found = conn.execute(text(query), {"name": name, "table": effects.name}).first()
    else:
        query = "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = :name"
        found = conn.execute(text(query), {"name": name}).first()
    return found is not None


def _trigger_name(effects: Table, event: str) -> str:
    return f"{effects.name}_counted_{event}_v{_VERSION}"


def _sql(expression: ColumnElement[str], dialect: Dialect) -> str:
    return str(expression.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def _sqlite_triggers(effects: Table, destination_of: Destination) -> list[str]:
    def dest(row: str) -> str:
        return _sql(destination_of(effects.alias(row)), SQLiteDialect())

    def add(row: str, n: int) -> str:
        return (
            f"INSERT INTO {counts.name} (destination, status, n) "  # noqa: S608 - our own SQL
            f"VALUES ({dest(row)}, {row}.status, {n}) "
            "ON CONFLICT (destination, status) DO UPDATE SET n = n + excluded.n;"
        )

    table = effects.name
    return [
        f"CREATE TRIGGER {_trigger_name(effects, 'insert')} AFTER INSERT ON {table} "
        f"BEGIN {add('new', 1)} END",
        f"CREATE TRIGGER {_trigger_name(effects, 'update')} AFTER UPDATE ON {table} "
        f"WHEN old.status IS NOT new.status OR {dest('old')} IS NOT {dest('new')} "
        f"BEGIN {add('old', -1)} {add('new', 1)} END",
        f"CREATE TRIGGER {_trigger_name(effects, 'delete')} AFTER DELETE ON {table} "
        f"BEGIN {add('old', -1)} END",
    ]


def _postgres_triggers(effects: Table, destination_of: Destination) -> list[str]:
    def dest(row: str) -> str:
        return _sql(destination_of(effects.alias(row)), PGDialect())  # type: ignore[no-untyped-call]

    def append(rows: str) -> str:
        return (
            f"INSERT INTO {changes.name} (destination, status, n) "  # noqa: S608 - our own SQL
            f"SELECT destination, status, sum(n) FROM ({rows}) AS changed "
            "GROUP BY destination, status HAVING sum(n) <> 0;"
        )

    changed = (
        "FROM old_rows JOIN new_rows USING (id) WHERE old_rows.status <> new_rows.status "
        f"OR {dest('old_rows')} <> {dest('new_rows')}"
    )
    inserted = f"SELECT {dest('new_rows')} AS destination, status, 1 AS n FROM new_rows"  # noqa: S608
    deleted = f"SELECT {dest('old_rows')} AS destination, status, -1 AS n FROM old_rows"  # noqa: S608
    bodies = {
        "insert": append(inserted),
        "update": append(
            f"SELECT {dest('old_rows')} AS destination, old_rows.status, -1 AS n {changed} "
            f"UNION ALL SELECT {dest('new_rows')}, new_rows.status, 1 {changed}"
        ),
        "delete": append(deleted),
    }
    transition = {
        "insert": "NEW TABLE AS new_rows",
        "update": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
        "delete": "OLD TABLE AS old_rows",
    }
    statements = []
    for event, body in bodies.items():
        name = _trigger_name(effects, event)
        statements += [
            f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN {body} RETURN NULL; END $$",
            f"CREATE TRIGGER {name} AFTER {event.upper()} ON {effects.name} "
            f"REFERENCING {transition[event]} FOR EACH STATEMENT EXECUTE FUNCTION {name}()",
        ]
    return statements
