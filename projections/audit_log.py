"""audit_log: who recorded every event, queryable; the store's digest, kept at checkpoints.

One row per stored event (orders' events, and keys earlier versions stored as events): its
position, order, version, type, time, event id, actor, request, correlation and causation, and its
link in the order's hash chain. The projection also folds every chained event into the digest of
the whole sequence (domain/chain.py), in read order (domain/eventstore.py: by transaction id, then
position), and records it at every multiple of ``CHECKPOINT_INTERVAL`` positions;
``take_checkpoint`` records one on demand. A checkpoint is the digest of every chained event up to
its (transaction id, position) pair in read order. Checkpoints live in one table shared by every
generation: a rebuild computes the same digests and keeps those already there, so a checkpoint
handed out once stays comparable with the store for good.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    select,
    tuple_,
)
from sqlalchemy.dialects import postgresql, sqlite

from domain.audit import metadata_of
from domain.chain import ALGORITHM, GENESIS, extend_digest
from domain.eventstore import START
from domain.eventstore import Checkpoint as StoreCheckpoint
from projections.base import Batch, Projection
from projections.engine.database import (
    add_missing_columns,
    insert_rows,
    install_schema,
    write_transaction,
)
from projections.engine.source import RecordedEvent

CHECKPOINT_INTERVAL = 10_000
"""The audit log records the digest at every multiple of this many positions."""

NAME = "audit_log"
_DIGEST_ROW = 1

checkpoint_metadata = MetaData()
checkpoints = Table(
    "audit_checkpoints",
    checkpoint_metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("events", BigInteger, nullable=False),
    Column("digest", LargeBinary(32), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("reason", String(16), nullable=False),
    # With position, where the checkpoint sits in read order; 0 in rows of older versions.
    Column("tx_id", BigInteger, nullable=False, default=0, server_default="0"),
)


class InvalidCursorError(ValueError):
    """A page cursor that this read model did not issue."""


class InvalidCheckpointError(ValueError):
    """A checkpoint document that cannot be read."""


@dataclass(frozen=True)
class Checkpoint:
    """The digest of every chained event up to ``(tx, position)`` in read order (``events`` of
    them)."""

    position: int
    events: int
    digest: bytes
    created_at: datetime
    reason: str
    """``interval`` (every CHECKPOINT_INTERVAL positions) or ``requested``."""
    tx: int = 0
    """The transaction id of the read order pair (0 on SQLite and for older checkpoints)."""

    @property
    def at(self) -> StoreCheckpoint:
        """Where it sits in read order."""
        return StoreCheckpoint(self.tx, self.position)

    def document(self) -> dict[str, Any]:
        """The checkpoint as it is handed out (JSON), to be kept outside the store."""
        return {
            "algorithm": ALGORITHM,
            "tx": self.tx,
            "position": self.position,
            "events": self.events,
            "digest": self.digest.hex(),
            "created_at": self.created_at.isoformat(),
            "reason": self.reason,
        }

    @classmethod
    def from_document(cls, document: Any) -> Checkpoint:
        """A checkpoint handed out before; a clear error for anything else."""
        if not isinstance(document, dict):
            raise InvalidCheckpointError("a checkpoint is a JSON object")
        if document.get("algorithm", ALGORITHM) != ALGORITHM:
            raise InvalidCheckpointError(
                f"checkpoint algorithm {document.get('algorithm')!r} is not {ALGORITHM!r}"
            )
        try:
            position, events = document["position"], document["events"]
            tx = document.get("tx", 0)
            digest = bytes.fromhex(document["digest"])
            created_at = datetime.fromisoformat(document.get("created_at") or "1970-01-01Z")
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidCheckpointError(
                f"a checkpoint needs position, events and a hex digest ({error})"
            ) from None
        if type(position) is not int or type(events) is not int or position < 1 or events < 0:
            raise InvalidCheckpointError("position must be 1 or more and events 0 or more")
        if type(tx) is not int or tx < 0:
            raise InvalidCheckpointError("tx must be 0 or more")
        if len(digest) != 32:
            raise InvalidCheckpointError("the digest must be 64 hex characters (SHA-256)")
        reason = str(document.get("reason", "given"))
        return cls(position, events, digest, created_at, reason, tx)


def checkpoints_from_json(text: str) -> list[Checkpoint]:
    """Checkpoints from a file: one, a list, or a GET /audit/checkpoints page."""
    try:
        parsed = json.loads(text)
    except ValueError as error:
        raise InvalidCheckpointError(f"the checkpoint file is not JSON: {error}") from None
    if isinstance(parsed, dict) and isinstance(parsed.get("data"), list):
        parsed = parsed["data"]
    documents = parsed if isinstance(parsed, list) else [parsed]
    return [Checkpoint.from_document(document) for document in documents]


@dataclass(frozen=True)
class AuditEntry:
    """One row of the audit log."""

    position: int
    order_id: str
    version: int
    event_type: str
    recorded_at: datetime
    event_id: str
    actor_kind: str
    actor_id: str
    actor_name: str
    actor_role: str
    request_id: str
    correlation_id: str
    causation_id: str
    chain_hash: bytes | None


@dataclass(frozen=True)
class AuditFilters:
    """What GET /audit and ``orderledger audit log`` filter on; None matches everything."""

    actor: str | None = None
    order_id: str | None = None
    event_type: str | None = None
    correlation_id: str | None = None
    recorded_from: datetime | None = None
    recorded_to: datetime | None = None
    """Exclusive."""


@dataclass(frozen=True)
class AuditPage:
    items: list[AuditEntry]
    next_cursor: str | None


class AuditLogProjection(Projection):
    """Every event's who and why, and the digest of the whole sequence."""

    name = NAME
    version = 2
    handles = ()
    """Every event: the digest must cover every stored row."""

    def setup(self, engine: Engine, head: StoreCheckpoint) -> None:
        def install(conn: Connection) -> None:
            checkpoint_metadata.create_all(conn, checkfirst=True)
            add_missing_columns(conn, checkpoints)

        install_schema(engine, install)

    def define_tables(self, metadata: MetaData, suffix: str) -> dict[str, Table]:
        log = Table(
            f"audit_log{suffix}",
            metadata,
            Column("position", BigInteger, primary_key=True, autoincrement=False),
            Column("order_id", String(36), nullable=False),
            Column("version", Integer, nullable=False),
            Column("event_type", String(64), nullable=False),
            Column("recorded_at", DateTime(timezone=True), nullable=False),
            Column("event_id", String(64), nullable=False),
            Column("actor_kind", String(16), nullable=False),
            Column("actor_id", String(128), nullable=False),
            Column("actor_name", String(128), nullable=False),
            Column("actor_role", String(16), nullable=False),
            Column("request_id", String(200), nullable=False),
            Column("correlation_id", String(200), nullable=False),
            Column("causation_id", String(64), nullable=False),
            Column("chain_hash", LargeBinary(32)),
            Column("tx_id", BigInteger, nullable=False),
            Index(f"audit_log{suffix}_read_order", "tx_id", "position"),
            Index(f"audit_log{suffix}_order", "order_id", "position"),
            Index(f"audit_log{suffix}_actor", "actor_id", "position"),
            Index(f"audit_log{suffix}_correlation", "correlation_id", "position"),
            Index(f"audit_log{suffix}_type", "event_type", "position"),
            Index(f"audit_log{suffix}_recorded", "recorded_at", "position"),
        )
        digest = Table(
            f"audit_digest{suffix}",
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=False),
            Column("position", BigInteger, nullable=False),
            Column("tx_id", BigInteger, nullable=False),
            Column("events", BigInteger, nullable=False),
            Column("digest", LargeBinary(32), nullable=False),
        )
        return {"audit_log": log, "audit_digest": digest}

    def batch(self, conn: Connection, tables: dict[str, Table]) -> Batch:
        return AuditLogBatch(conn, tables)


class AuditLogBatch(Batch):
    """Log rows for a batch, the digest folded forward, checkpoints at interval boundaries."""

    def __init__(self, conn: Connection, tables: dict[str, Table]) -> None:
        super().__init__(conn, tables)
        self.rows: list[dict[str, Any]] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.last = START
        self.events = 0
        self.digest = GENESIS
        self.found = False

    def load(self, events: Sequence[RecordedEvent]) -> None:
        table = self.tables["audit_digest"]
        row = self.conn.execute(select(table).where(table.c.id == _DIGEST_ROW)).first()
        if row is not None:
            self.found = True
            self.last = StoreCheckpoint(row.tx_id, row.position)
            self.events, self.digest = row.events, bytes(row.digest)

    def handle(self, recorded: RecordedEvent) -> None:
        event = recorded.event
        metadata = metadata_of(event)
        actor = metadata["actor"]
        link = recorded.chain_hash
        self.rows.append(
            {
                "position": recorded.position,
                "order_id": str(event.originator_id),
                "version": event.originator_version,
                "event_type": recorded.type_name,
                "recorded_at": event.timestamp,
                "event_id": metadata["event_id"],
                "actor_kind": actor["kind"],
                "actor_id": actor["id"],
                "actor_name": actor.get("name", ""),
                "actor_role": actor.get("role", ""),
                "request_id": metadata["request_id"],
                "correlation_id": metadata["correlation_id"],
                "causation_id": metadata["causation_id"],
                "chain_hash": link,
                "tx_id": recorded.tx,
            }
        )
        if link is None:
            return  # recorded before events were chained: not part of the digest
        # A boundary B passed between the last event and this one is the pair (last tx, B):
        # no event of the last one's transaction lies between them in read order.
        boundary = -(-self.last.position // CHECKPOINT_INTERVAL) * CHECKPOINT_INTERVAL
        while self.events and boundary < recorded.position:
            self.checkpoints.append(self._checkpoint(boundary, "interval"))
            boundary += CHECKPOINT_INTERVAL
        self.digest = extend_digest(self.digest, recorded.position, link)
        self.events += 1
        self.last = recorded.checkpoint

    def _checkpoint(self, position: int, reason: str) -> dict[str, Any]:
        return {
            "tx_id": self.last.tx,
            "position": position,
            "events": self.events,
            "digest": self.digest,
            "created_at": datetime.now(UTC),
            "reason": reason,
        }

    def flush(self) -> None:
        insert_rows(self.conn, self.tables["audit_log"], self.rows)
        insert_checkpoints(self.conn, self.checkpoints)
        if not self.events:
            return
        table = self.tables["audit_digest"]
        values = {
            "position": self.last.position,
            "tx_id": self.last.tx,
            "events": self.events,
            "digest": self.digest,
        }
        if self.found:
            self.conn.execute(table.update().where(table.c.id == _DIGEST_ROW).values(values))
        else:
            self.conn.execute(table.insert().values(id=_DIGEST_ROW, **values))


def insert_checkpoints(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Record checkpoints; one already recorded at a position is kept as it is."""
    if rows:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        conn.execute(dialect.insert(checkpoints).on_conflict_do_nothing(), rows)


# -- queries --------------------------------------------------------------------------------


def _entry(row: Any) -> AuditEntry:
    values = dict(row._mapping)
    del values["tx_id"]  # read order is the engine's business; entries list by position
    values["recorded_at"] = _utc(values["recorded_at"])
    if values["chain_hash"] is not None:
        values["chain_hash"] = bytes(values["chain_hash"])
    return AuditEntry(**values)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def encode_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"a{position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith("a"):
            raise ValueError(cursor)
        return int(text[1:])
    except ValueError:
        raise InvalidCursorError(
            "cursor is malformed; use the one a previous page returned"
        ) from None


def list_audit_entries(
    conn: Connection,
    tables: dict[str, Table],
    filters: AuditFilters,
    *,
    limit: int,
    cursor: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> AuditPage:
    """One page of the log, by position (newest first unless ``order`` is asc)."""
    table = tables["audit_log"]
    query = select(table)
    conditions = [
        (filters.actor, table.c.actor_id),
        (filters.order_id, table.c.order_id),
        (filters.event_type, table.c.event_type),
        (filters.correlation_id, table.c.correlation_id),
    ]
    for value, column in conditions:
        if value is not None:
            query = query.where(column == value)
    if filters.recorded_from is not None:
        query = query.where(table.c.recorded_at >= filters.recorded_from)
    if filters.recorded_to is not None:
        query = query.where(table.c.recorded_at < filters.recorded_to)
    if cursor is not None:
        after = decode_cursor(cursor)
        query = query.where(
            table.c.position > after if order == "asc" else table.c.position < after
        )
    ordering = table.c.position.asc() if order == "asc" else table.c.position.desc()
    rows = conn.execute(query.order_by(ordering).limit(limit + 1)).all()
    items = [_entry(row) for row in rows[:limit]]
    next_cursor = encode_cursor(items[-1].position) if len(rows) > limit else None
    return AuditPage(items=items, next_cursor=next_cursor)


AuditRow = tuple[int, str, int, bytes | None, int]
"""(position, order id, version, chain hash, transaction id) as the audit log recorded it."""


def audit_rows(
    conn: Connection,
    tables: dict[str, Table],
    *,
    after: StoreCheckpoint,
    upto: StoreCheckpoint,
    limit: int,
) -> list[AuditRow]:
    """The log's rows in (after, upto], in read order."""
    table = tables["audit_log"]
    at = tuple_(table.c.tx_id, table.c.position)
    query = (
        select(*_audit_row_columns(table))
        .where(at > tuple_(*after), at <= tuple_(*upto))
        .order_by(table.c.tx_id, table.c.position)
        .limit(limit)
    )
    return [_audit_row(row) for row in conn.execute(query)]


def order_audit_rows(
    conn: Connection, tables: dict[str, Table], order_id: str, *, upto: StoreCheckpoint
) -> list[AuditRow]:
    """One order's rows up to ``upto`` in read order (an order's positions only grow)."""
    table = tables["audit_log"]
    query = (
        select(*_audit_row_columns(table))
        .where(
            table.c.order_id == order_id,
            tuple_(table.c.tx_id, table.c.position) <= tuple_(*upto),
        )
        .order_by(table.c.position)
    )
    return [_audit_row(row) for row in conn.execute(query)]


def _audit_row_columns(table: Table) -> list[Any]:
    c = table.c
    return [c.position, c.order_id, c.version, c.chain_hash, c.tx_id]


def _audit_row(row: Any) -> AuditRow:
    return (row[0], row[1], row[2], None if row[3] is None else bytes(row[3]), row[4])


def list_checkpoints(conn: Connection) -> list[Checkpoint]:
    """Every recorded checkpoint, oldest first."""
    rows = conn.execute(
        select(checkpoints).order_by(checkpoints.c.tx_id, checkpoints.c.position)
    ).all()
    return [_checkpoint_of(r) for r in rows]


def _checkpoint_of(r: Any) -> Checkpoint:
    return Checkpoint(r.position, r.events, bytes(r.digest), _utc(r.created_at), r.reason, r.tx_id)


def take_checkpoint(conn: Connection, tables: dict[str, Table]) -> Checkpoint | None:
    """Record the digest as the audit log has it now (None before any chained event)."""
    table = tables["audit_digest"]
    row = conn.execute(select(table).where(table.c.id == _DIGEST_ROW)).first()
    if row is None:
        return None
    insert_checkpoints(
        conn,
        [
            {
                "tx_id": row.tx_id,
                "position": row.position,
                "events": row.events,
                "digest": bytes(row.digest),
                "created_at": datetime.now(UTC),
                "reason": "requested",
            }
        ],
    )
    found = conn.execute(select(checkpoints).where(checkpoints.c.position == row.position)).one()
    return _checkpoint_of(found)


def request_checkpoint(engine: Engine, serving_tables: Any) -> Checkpoint | None:
    """Record a checkpoint now, in a write transaction on the serving generation's tables.

    ``serving_tables(conn, name)`` is the catalog's lookup of the tables readers use.
    """
    with write_transaction(engine) as conn:
        return take_checkpoint(conn, serving_tables(conn, NAME))
