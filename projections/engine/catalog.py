"""The tracking table: every generation of every projection, its position, lease and last error.

A projection's tables exist in generations (``order_summaries_g1``, ``_g2``, ...). Exactly one
generation is *serving* (readers use it); at most one is *building* (a rebuild from event zero).
Each generation is advanced by compare-and-set on its checkpoint and on the fencing epoch of the
lease its worker holds, in the same transaction as its read-model rows.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    insert,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.exc import OperationalError

from domain.eventstore import Checkpoint
from projections.base import Projection, generation_suffix
from projections.engine.database import (
    add_missing_columns,
    db_now,
    install_schema,
    write_transaction,
)

log = logging.getLogger("orderledger.projections")

SERVING = "serving"
BUILDING = "building"
RETIRED = "retired"
DROPPED = "dropped"

DROP_LOCK_TIMEOUT_MS = 500
"""How long dropping a retired generation's tables waits for readers still in them (an open
psql session, a pg_dump) before giving up until a later pass: while a DROP TABLE waits, every
new reader of that table queues behind it, and so would the worker that issued it."""

catalog_metadata = MetaData()


def _one_per_projection(role: str) -> Index:
    """At most one generation of each projection in ``role``."""
    only_role = text(f"role = '{role}'")
    return Index(
        f"projection_generations_one_{role}",
        "name",
        unique=True,
        sqlite_where=only_role,
        postgresql_where=only_role,
    )


generations = Table(
    "projection_generations",
    catalog_metadata,
    Column("name", String(64), primary_key=True),
    Column("generation", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("role", String(16), nullable=False),
    Column("position", BigInteger, nullable=False, default=0),
    # With position, the checkpoint (domain/eventstore.py); 0 in rows of older versions.
    Column("tx_id", BigInteger, nullable=False, default=0, server_default="0"),
    Column("target_position", BigInteger, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("progressed_at", Float, nullable=False),
    Column("lease_owner", String(128)),
    Column("lease_epoch", BigInteger, nullable=False, default=0),
    Column("lease_expires_at", Float),
    Column("error_position", BigInteger),
    Column("error_event_id", String(64)),
    Column("error_event_type", String(64)),
    Column("error_message", Text),
    Column("error_at", Float),
    *(_one_per_projection(role) for role in (SERVING, BUILDING)),
)


lag_samples = Table(
    "projection_lag_samples",
    catalog_metadata,
    Column("name", String(64), primary_key=True),
    Column("minute", BigInteger, primary_key=True),
    Column("lag_events", BigInteger, nullable=False),
    Column("lag_seconds", Float, nullable=False),
)
"""Each serving projection's lag, one sample a minute (the last of that minute), for an hour."""

LAG_HISTORY_MINUTES = 60


_SERVING = select(generations).where(
    generations.c.name == bindparam("name"), generations.c.role == SERVING
)
"""The serving generation of a projection: built once, as every read looks it up."""


@dataclass(frozen=True)
class LagSample:
    """A projection's lag at one minute (epoch seconds // 60)."""

    minute: int
    lag_events: int
    lag_seconds: float


@dataclass(frozen=True)
class Generation:
    """One row of the tracking table."""

    name: str
    generation: int
    version: int
    role: str
    position: int
    tx_id: int
    target_position: int
    created_at: float
    updated_at: float
    progressed_at: float
    lease_owner: str | None
    lease_epoch: int
    lease_expires_at: float | None
    error_position: int | None
    error_event_id: str | None
    error_event_type: str | None
    error_message: str | None
    error_at: float | None

    @property
    def failed(self) -> bool:
        return self.error_position is not None

    @property
    def checkpoint(self) -> Checkpoint:
        """Every event up to here in read order is applied."""
        return Checkpoint(self.tx_id, self.position)


@dataclass(frozen=True)
class Lease:
    """Proof that a worker may advance a generation: checked at every commit."""

    name: str
    generation: int
    owner: str
    epoch: int


def _fenced_by(lease: Lease) -> tuple[ColumnElement[bool], ...]:
    """The lease's generation row, as long as no later lease on it was granted (its epoch)."""
    return (
        generations.c.name == lease.name,
        generations.c.generation == lease.generation,
        generations.c.lease_epoch == lease.epoch,
    )


class NewerVersionError(Exception):
    """The store holds a newer version of a projection than this code runs (a rolling upgrade)."""


class LeaseLostError(Exception):
    """The generation moved on or was taken over; the caller's transaction must not commit."""


class Catalog:
    """Reads and changes the tracking table and creates or drops generations' tables."""

    def __init__(self, engine: Engine, projections: Sequence[Projection]) -> None:
        self.engine = engine
        self.projections = {p.name: p for p in projections}
        self._tables: dict[tuple[str, int], dict[str, Table]] = {}
        self._lock = threading.Lock()
        self.now = db_now(engine.dialect.name)
        # Built once: every batch commits through it, and building it anew cost about as
        # much as running it.
        self._advance = (
            update(generations)
            .where(
                generations.c.name == bindparam("a_name"),
                generations.c.generation == bindparam("a_generation"),
                generations.c.role.in_([SERVING, BUILDING]),
                generations.c.position == bindparam("a_expected"),
                generations.c.tx_id == bindparam("a_expected_tx"),
                generations.c.lease_owner == bindparam("a_owner"),
                generations.c.lease_epoch == bindparam("a_epoch"),
            )
            .values(
                position=bindparam("a_position", type_=BigInteger),
                tx_id=bindparam("a_tx", type_=BigInteger),
                updated_at=self.now,
                progressed_at=self.now,
                lease_expires_at=self.now + bindparam("a_ttl", type_=Float),
                error_position=None,
                error_event_id=None,
                error_event_type=None,
                error_message=None,
                error_at=None,
            )
        )

    def install(self) -> None:
        """Create the tracking table (idempotent; safe when several processes start at once)."""

        def install(conn: Connection) -> None:
            catalog_metadata.create_all(conn, checkfirst=True)
            # A position-only checkpoint p of an older version is the pair (0, p).
            add_missing_columns(conn, generations)

        install_schema(self.engine, install)

    # -- tables of a generation -------------------------------------------------------------

    def tables(self, name: str, generation: int) -> dict[str, Table]:
        """The SQLAlchemy tables of one generation (declared once per process)."""
        key = (name, generation)
        with self._lock:
            if key not in self._tables:
                self._tables[key] = self.projections[name].define_tables(
                    MetaData(), generation_suffix(generation)
                )
            return self._tables[key]

    def serving_tables(self, conn: Connection, name: str) -> dict[str, Table]:
        """The tables readers should use now."""
        row = self._serving(conn, name)
        if row is None:
            raise LookupError(f"projection {name!r} has no serving generation yet")
        return self.tables(name, row.generation)

    # -- rows -------------------------------------------------------------------------------

    def rows(self, name: str | None = None) -> list[Generation]:
        with self.engine.connect() as conn:
            query = (
                select(generations)
                .where(generations.c.role != DROPPED)
                .order_by(generations.c.name, generations.c.generation)
            )
            if name is not None:
                query = query.where(generations.c.name == name)
            return [Generation(**row._mapping) for row in conn.execute(query)]

    def row(self, name: str, generation: int) -> Generation | None:
        with self.engine.connect() as conn:
            return self._row(conn, name, generation)

    def serving(self, name: str) -> Generation | None:
        with self.engine.connect() as conn:
            return self._serving(conn, name)

    def _row(self, conn: Connection, name: str, generation: int) -> Generation | None:
        row = conn.execute(
            select(generations).where(
                generations.c.name == name, generations.c.generation == generation
            )
        ).first()
        return Generation(**row._mapping) if row else None

    def _serving(self, conn: Connection, name: str) -> Generation | None:
        row = conn.execute(_SERVING, {"name": name}).first()
        return Generation(**row._mapping) if row else None

    @contextmanager
    def _exclusive(self, name: str) -> Iterator[Connection]:
        """A write transaction serialised per projection across processes."""
        with write_transaction(self.engine) as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                    {"key": f"orderledger.projection.{name}"},
                )
            yield conn

    # -- life cycle of generations ----------------------------------------------------------

    def ensure(self, projection: Projection) -> None:
        """Make sure the projection serves; if its code version changed, start a rebuild.

        Older code (a worker not yet upgraded) leaves a newer generation alone: see ``refusal``.
        """
        with self._exclusive(projection.name) as conn:
            serving = self._serving(conn, projection.name)
            if serving is None:
                self._create_generation(conn, projection, SERVING, 0)
                return
            outdated = serving.version != projection.version
        if not outdated:
            return
        refused = self.refusal(projection.name)
        if refused is not None:
            log.warning("leaving projection=%s alone: %s", projection.name, refused)
            return
        self.start_rebuild(projection.name)

    def refusal(self, name: str, rows: Sequence[Generation] | None = None) -> str | None:
        """Why this code must not build or replace ``name``'s generations, or None if it may.

        A generation of a newer version, serving or building, belongs to newer code: an older
        worker restarting during a rolling upgrade would otherwise throw it away and rebuild
        to the older version.
        """
        mine = self.projections[name].version
        live = [
            r for r in (self.rows(name) if rows is None else rows) if r.role in (SERVING, BUILDING)
        ]
        newest = max((r.version for r in live), default=mine)
        if newest <= mine:
            return None
        return f"refused: store has version {newest}, this worker runs {mine}"

    def start_rebuild(self, name: str, *, target: int = 0, restart: bool = False) -> Generation:
        """Begin building a new generation from event zero, or return the one in progress."""
        projection = self.projections[name]
        refused = self.refusal(name)
        if refused is not None:
            raise NewerVersionError(f"{name}: {refused}")
        with self._exclusive(name) as conn:
            building = conn.execute(
                select(generations).where(
                    generations.c.name == name, generations.c.role == BUILDING
                )
            ).first()
            if building is not None:
                existing = Generation(**building._mapping)
                resumable = existing.version == projection.version and not restart
                if resumable and not existing.failed:
                    return existing
                self._drop_generation(conn, name, existing.generation)
            return self._create_generation(conn, projection, BUILDING, target)

    def set_target(self, name: str, generation: int, target: int) -> None:
        """Record the head a rebuild is heading for (for progress and ETA)."""
        with write_transaction(self.engine) as conn:
            conn.execute(
                update(generations)
                .where(generations.c.name == name, generations.c.generation == generation)
                .values(target_position=target)
            )

    def _create_generation(
        self, conn: Connection, projection: Projection, role: str, target: int
    ) -> Generation:
        number = (
            conn.execute(
                select(generations.c.generation)
                .where(generations.c.name == projection.name)
                .order_by(generations.c.generation.desc())
                .limit(1)
            ).scalar()
            or 0
        ) + 1
        tables = self.tables(projection.name, number)
        for table in tables.values():
            table.drop(conn, checkfirst=True)
            table.create(conn)
        conn.execute(
            insert(generations).values(
                name=projection.name,
                generation=number,
                version=projection.version,
                role=role,
                position=0,
                tx_id=0,
                target_position=target,
                created_at=self.now,
                updated_at=self.now,
                progressed_at=self.now,
                lease_epoch=0,
            )
        )
        row = self._row(conn, projection.name, number)
        assert row is not None
        return row

    def _drop_generation(self, conn: Connection, name: str, generation: int) -> None:
        # The row stays (as dropped) so a generation number is never handed out twice.
        for table in self.tables(name, generation).values():
            table.drop(conn, checkfirst=True)
        conn.execute(
            update(generations)
            .where(generations.c.name == name, generations.c.generation == generation)
            .values(role=DROPPED, lease_owner=None, updated_at=self.now)
        )

    def drop_retired(self, name: str) -> int:
        """Drop the tables of generations that no longer serve; returns how many.

        Each in its own transaction, waiting at most ``DROP_LOCK_TIMEOUT_MS`` for readers still
        in its tables; one that times out stays retired (a pending drop) for a later pass.
        """
        with self.engine.connect() as conn:
            retired: list[int] = list(
                conn.execute(
                    select(generations.c.generation).where(
                        generations.c.name == name, generations.c.role == RETIRED
                    )
                ).scalars()
            )
        dropped = 0
        for generation in retired:
            try:
                with self._exclusive(name) as conn:
                    if conn.dialect.name == "postgresql":
                        conn.execute(text(f"SET LOCAL lock_timeout = {DROP_LOCK_TIMEOUT_MS}"))
                    row = self._row(conn, name, generation)
                    if row is None or row.role != RETIRED:
                        continue
                    self._drop_generation(conn, name, generation)
                dropped += 1
            except OperationalError as error:
                log.warning(
                    "retired generation still in use, dropping it later projection=%s "
                    "generation=%s: %s",
                    name,
                    generation,
                    error.orig,
                )
        return dropped

    def promote(self, conn: Connection, lease: Lease, checkpoint: Checkpoint) -> bool:
        """In the caller's transaction, make a caught-up building generation the serving one.

        Only at or past the serving generation's checkpoint, so reads never go backwards;
        False (nothing changed) while the serving one is further on.
        """
        retired = conn.execute(
            update(generations)
            .where(
                generations.c.name == lease.name,
                generations.c.role == SERVING,
                tuple_(generations.c.tx_id, generations.c.position) <= tuple_(*checkpoint),
            )
            .values(role=RETIRED, updated_at=self.now)
        )
        if retired.rowcount == 0 and self._serving(conn, lease.name) is not None:
            return False
        result = conn.execute(
            update(generations)
            .where(
                *_fenced_by(lease),
                generations.c.role == BUILDING,
                generations.c.position == checkpoint.position,
                generations.c.tx_id == checkpoint.tx,
                generations.c.lease_owner == lease.owner,
            )
            .values(role=SERVING, updated_at=self.now)
        )
        if result.rowcount != 1:
            raise LeaseLostError(f"{lease.name} generation {lease.generation} could not take over")
        return True

    # -- leases and positions ------------------------------------------------------------------

    def acquire(self, name: str, generation: int, owner: str, ttl: float) -> Lease | None:
        """Take the generation's lease if it is free, expired or already ours."""
        with write_transaction(self.engine) as conn:
            result = conn.execute(
                update(generations)
                .where(
                    generations.c.name == name,
                    generations.c.generation == generation,
                    generations.c.role.in_([SERVING, BUILDING]),
                    (generations.c.lease_owner.is_(None))
                    | (generations.c.lease_owner == owner)
                    | (generations.c.lease_expires_at < self.now),
                )
                .values(
                    lease_owner=owner,
                    lease_epoch=generations.c.lease_epoch + 1,
                    lease_expires_at=self.now + ttl,
                )
            )
            if result.rowcount != 1:
                return None
            epoch: int = conn.execute(
                select(generations.c.lease_epoch).where(
                    generations.c.name == name, generations.c.generation == generation
                )
            ).scalar_one()
        return Lease(name=name, generation=generation, owner=owner, epoch=epoch)

    def advance(
        self,
        conn: Connection,
        lease: Lease,
        expected: Checkpoint,
        checkpoint: Checkpoint,
        ttl: float,
    ) -> None:
        """In the caller's transaction: compare-and-set the checkpoint; raise if it moved on."""
        result = conn.execute(
            self._advance,
            {
                "a_name": lease.name,
                "a_generation": lease.generation,
                "a_expected": expected.position,
                "a_expected_tx": expected.tx,
                "a_owner": lease.owner,
                "a_epoch": lease.epoch,
                "a_position": checkpoint.position,
                "a_tx": checkpoint.tx,
                "a_ttl": ttl,
            },
        )
        if result.rowcount != 1:
            raise LeaseLostError(
                f"{lease.name} generation {lease.generation} is no longer at checkpoint "
                f"{tuple(expected)} under lease epoch {lease.epoch}"
            )

    def heartbeat(self, lease: Lease, ttl: float) -> bool:
        """Extend the lease while idle; False if it was lost."""
        with write_transaction(self.engine) as conn:
            result = conn.execute(
                update(generations)
                .where(
                    *_fenced_by(lease),
                    generations.c.role.in_([SERVING, BUILDING]),
                    generations.c.lease_owner == lease.owner,
                )
                .values(lease_expires_at=self.now + ttl, updated_at=self.now)
            )
            return result.rowcount == 1

    def release(self, lease: Lease) -> None:
        """Give the lease up so another worker can take over at once."""
        with write_transaction(self.engine) as conn:
            conn.execute(
                update(generations)
                .where(*_fenced_by(lease), generations.c.lease_owner == lease.owner)
                .values(lease_owner=None, lease_expires_at=None)
            )

    def record_lag(self, name: str, at: float, lag_events: int, lag_seconds: float) -> None:
        """Keep the projection's lag for the minute of ``at``; forget samples over an hour old."""
        minute = int(at // 60)
        values = {"lag_events": lag_events, "lag_seconds": lag_seconds}
        with write_transaction(self.engine) as conn:
            conn.execute(
                lag_samples.delete().where(lag_samples.c.minute <= minute - LAG_HISTORY_MINUTES)
            )
            updated = conn.execute(
                update(lag_samples)
                .where(lag_samples.c.name == name, lag_samples.c.minute == minute)
                .values(values)
            )
            if updated.rowcount == 0:
                conn.execute(insert(lag_samples).values(name=name, minute=minute, **values))

    def lag_history(self, at: float) -> dict[str, list[LagSample]]:
        """Every projection's samples of the hour before ``at``, oldest first."""
        since = int(at // 60) - LAG_HISTORY_MINUTES
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(lag_samples)
                .where(lag_samples.c.minute > since)
                .order_by(lag_samples.c.name, lag_samples.c.minute)
            )
            found: dict[str, list[LagSample]] = {}
            for row in rows:
                found.setdefault(row.name, []).append(
                    LagSample(row.minute, row.lag_events, row.lag_seconds)
                )
        return found

    def record_error(
        self,
        lease: Lease,
        *,
        position: int,
        event_id: str,
        event_type: str,
        message: str,
    ) -> None:
        """Remember why a generation stopped, and where."""
        with write_transaction(self.engine) as conn:
            conn.execute(
                update(generations)
                .where(*_fenced_by(lease))
                .values(
                    error_position=position,
                    error_event_id=event_id,
                    error_event_type=event_type,
                    error_message=message[:2000],
                    error_at=self.now,
                    updated_at=self.now,
                )
            )
