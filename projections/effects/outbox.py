"""The outbox: side effects recorded exactly once per (effect, event position).

The ``outbox`` projection records, in the same transaction as its position, one row per
effect an event triggers: a webhook delivery per matching subscription, and a customer email
on placed, shipped and refunded. The outbox tables are shared by every generation of the
projection and an effect's identity, (effect, position), is unique in the database, so a crash,
a restart, a rebuild or a new projection version never records an effect twice. A rebuilt
generation records nothing at or below the high-water mark the projection already reached.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import singledispatchmethod
from typing import Any
from uuid import UUID, uuid5

from sqlalchemy import (
    BigInteger,
    Boolean,
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
    UniqueConstraint,
    case,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import FromClause

from domain.eventstore import START, Checkpoint, Snapshot
from domain.order import EVENT_TYPES, Order
from domain.personal import ERASED, PersonalDataErasure, reveal
from projections.base import Batch, Projection
from projections.effects.tally import install_counts
from projections.engine.database import (
    add_missing_columns,
    db_now,
    install_schema,
)
from projections.engine.source import RecordedEvent

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"
CANCELLED = "cancelled"
STATUSES = (PENDING, DELIVERED, DEAD, CANCELLED)

WEBHOOK = "webhook"
EMAIL = "email"

EMAIL_EVENTS = {"OrderPlaced", "OrderShipped", "RefundIssued"}
"""Events that send the customer an email (when the order has an address)."""

ERASED_REASON = "personal data erased"
"""Why an email effect was cancelled: its customer's personal data was erased."""

_EFFECT_NAMESPACE = UUID("1b7f0f55-0c55-4a52-9f6e-7f3c2d0b8e61")

outbox_metadata = MetaData()

effects = Table(
    "outbox_effects",
    outbox_metadata,
    Column("id", String(36), primary_key=True),
    Column("effect", String(96), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("order_id", String(36), nullable=False),
    Column("order_version", Integer, nullable=False),
    Column("event_type", String(32), nullable=False),
    Column("occurred_at", Float, nullable=False),
    Column("target", String(2048), nullable=False),
    Column("status", String(12), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("total_attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("claimed_by", String(128)),
    Column("claim_expires_at", Float),
    Column("created_at", Float, nullable=False),
    Column("delivered_at", Float),
    Column("last_error", Text),
    UniqueConstraint("effect", "position", name="outbox_effects_once"),
    Index("outbox_effects_due", "status", "next_attempt_at"),
    Index("outbox_effects_sequence", "order_id", "target", "position"),
    Index("outbox_effects_claims", "claim_expires_at"),
    Index("outbox_effects_order", "position", "effect"),  # the list, oldest first
)

attempts = Table(
    "outbox_attempts",
    outbox_metadata,
    Column("effect_id", String(36), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("started_at", Float, nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("outcome", String(12), nullable=False),
    Column("status_code", Integer),
    Column("error", Text),
)

subscriptions = Table(
    "webhook_subscriptions",
    outbox_metadata,
    Column("id", String(36), primary_key=True),
    Column("url", String(2048), nullable=False),
    Column("event_types", Text, nullable=False),
    Column("secret", String(128), nullable=False),
    Column("active", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_position", BigInteger, nullable=False),
    Column("created_tx_id", BigInteger, nullable=False, default=0, server_default="0"),
    # PostgreSQL: the transactions that had ended when it was created (see Subscription).
    Column("created_snapshot", Text),
)

watermarks = Table(
    "outbox_watermark",
    outbox_metadata,
    Column("name", String(64), primary_key=True),
    Column("installed_position", BigInteger, nullable=False),
    Column("position", BigInteger, nullable=False),
    # With the positions, checkpoints (domain/eventstore.py); 0 in rows of older versions.
    Column("installed_tx_id", BigInteger, nullable=False, default=0, server_default="0"),
    Column("tx_id", BigInteger, nullable=False, default=0, server_default="0"),
)


def effect_id(effect: str, position: int) -> str:
    """The effect's stable id: the receiver's idempotency key, the same across every retry."""
    return str(uuid5(_EFFECT_NAMESPACE, f"{effect}@{position}"))


def destination_of(table: FromClause) -> ColumnElement[str]:
    """Where an effect goes, as the counts group it: a webhook's URL, or "email" for every
    email (they all go through one mail server; their targets are customers)."""
    return case((table.c.kind == EMAIL, EMAIL), else_=table.c.target)


def email_target(customer_id: str) -> str:
    """An email effect's target: the customer, by pseudonymous id. The address itself is read
    from the order when the email is sent, so the outbox never holds it."""
    return f"{EMAIL}:{customer_id}"


def install_outbox(engine: Engine, head: Checkpoint) -> None:
    """Create the outbox tables; the first install starts effects after the current head.

    Effects begin when the outbox is installed: events recorded before (e.g. demo data or an
    import) trigger nothing. Email effects recorded by an older version, whose target was the
    address itself, lose it (the sender reads the address from the order).
    """

    def install(conn: Connection) -> None:
        outbox_metadata.create_all(conn, checkfirst=True)
        install_counts(conn, effects, destination_of)
        add_missing_columns(conn, watermarks)
        add_missing_columns(conn, subscriptions)
        for index in effects.indexes:  # added to a table created by an older version
            index.create(conn, checkfirst=True)
        exists = conn.execute(
            select(watermarks.c.name).where(watermarks.c.name == OutboxProjection.name)
        ).first()
        if exists is None:
            conn.execute(
                insert(watermarks).values(
                    name=OutboxProjection.name,
                    installed_position=head.position,
                    installed_tx_id=head.tx,
                    position=head.position,
                    tx_id=head.tx,
                )
            )
        conn.execute(
            update(effects)
            .where(effects.c.kind == EMAIL, effects.c.target.not_like(f"{EMAIL}:%"))
            .values(target=email_target("unknown"))
        )

    install_schema(engine, install)


@dataclass(frozen=True)
class Subscription:
    """A webhook endpoint and the event types it wants."""

    id: str
    url: str
    event_types: list[str]
    active: bool
    created_position: int
    created_tx: int = 0
    """With ``created_position``, the checkpoint after which it receives events."""
    created_snapshot: Snapshot | None = None
    """On PostgreSQL, which transactions had ended when it was created: it receives the
    events of every other one. The checkpoint cannot say so alone: an event committed just
    before may lie past the safe head, and one of a transaction still running then may
    commit after it with a lower transaction id."""

    def wants(self, event_type: str, checkpoint: Checkpoint) -> bool:
        if self.created_snapshot is not None:
            recorded_later = not self.created_snapshot.ended(checkpoint.tx)
        else:
            recorded_later = checkpoint > Checkpoint(self.created_tx, self.created_position)
        return (
            self.active
            and recorded_later
            and ("*" in self.event_types or event_type in self.event_types)
        )


def email_address(value: object) -> str | None:
    """An order's email address as the ledger reads it: none when it has none or it was erased."""
    email = reveal(value)
    return None if email is None or email == ERASED else str(email)


def contact_of(placed: Order.Placed) -> str | None:
    """Whom an order's emails go to: its customer, when the order has an address to mail."""
    return placed.customer_id if email_address(placed.customer_email) is not None else None


def effect_rows(
    recorded: RecordedEvent,
    subscriptions: Sequence[Subscription],
    contact: str | None,
    now: float,
) -> list[dict[str, Any]]:
    """The outbox rows an event calls for: one per webhook subscribed to its type and, for the
    events that mail the customer, one email to ``contact`` (a customer id).

    Only order events have effects: the store's other records (idempotency keys, and whatever
    else it may hold) call for none, even from a subscription to every type (``*``).
    """
    event_type = recorded.type_name
    if event_type not in EVENT_TYPES:
        return []
    targets = [
        (f"{WEBHOOK}:{subscription.id}", WEBHOOK, subscription.url)
        for subscription in subscriptions
        if subscription.wants(event_type, recorded.checkpoint)
    ]
    if contact is not None and event_type in EMAIL_EVENTS:
        targets.append((f"{EMAIL}:{event_type}", EMAIL, email_target(contact)))
    event = recorded.event
    return [
        {
            "id": effect_id(effect, recorded.position),
            "effect": effect,
            "kind": kind,
            "position": recorded.position,
            "order_id": str(event.originator_id),
            "order_version": event.originator_version,
            "event_type": event_type,
            "occurred_at": event.timestamp.timestamp(),
            "target": target,
            "status": PENDING,
            "attempts": 0,
            "total_attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for effect, kind, target in targets
    ]


def watermark_of(row: Any) -> Checkpoint:
    """The outbox's high-water mark: effects of events up to it are recorded."""
    return Checkpoint(row.tx_id, row.position)


def installed_at(row: Any) -> Checkpoint:
    """Where the outbox was installed: events up to it trigger nothing."""
    return Checkpoint(row.installed_tx_id, row.installed_position)


def load_subscriptions(conn: Connection) -> list[Subscription]:
    rows = conn.execute(select(subscriptions).where(subscriptions.c.active.is_(True)))
    return [subscription_of(row) for row in rows]


def subscription_of(row: Any) -> Subscription:
    """A subscription as its row stores it."""
    return Subscription(
        id=row.id,
        url=row.url,
        event_types=json.loads(row.event_types),
        active=row.active,
        created_position=row.created_position,
        created_tx=row.created_tx_id,
        created_snapshot=(
            None if row.created_snapshot is None else Snapshot.parse(row.created_snapshot)
        ),
    )


def insert_ignoring_duplicates(
    conn: Connection, rows: list[dict[str, Any]], *, count: bool = False
) -> int:
    """Insert outbox rows; a row whose (effect, position) exists already is left as it is.

    With ``count``, returns how many were new (one more query; the outbox's hot path skips it).
    """
    if not rows:
        return 0
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(effects).on_conflict_do_nothing()
    existing: set[str] = set()
    if count:
        ids = [r["id"] for r in rows]
        for start in range(0, len(ids), 500):
            found = conn.execute(
                select(effects.c.id).where(effects.c.id.in_(ids[start : start + 500]))
            )
            existing.update(row.id for row in found)
    conn.execute(statement, rows)
    return len([r for r in rows if r["id"] not in existing])


def cancel_emails(conn: Connection, contacts: Table, customer_id: str, *, before: int) -> int:
    """Cancel the customer's emails not yet delivered (pending or dead) from events before
    ``before``: their personal data was erased there. Repeating it changes nothing."""
    orders = select(contacts.c.order_id).where(contacts.c.customer_id == customer_id)
    result = conn.execute(
        update(effects)
        .where(
            effects.c.kind == EMAIL,
            effects.c.status.in_([PENDING, DEAD]),
            effects.c.position < before,
            effects.c.order_id.in_(orders),
        )
        .values(status=CANCELLED, last_error=ERASED_REASON, claimed_by=None, claim_expires_at=None)
    )
    return int(result.rowcount)


class OutboxProjection(Projection):
    """Records the side effects each event triggers, in the outbox, once per position."""

    name = "outbox"
    version = 2
    handles = (*EVENT_TYPES.values(), PersonalDataErasure.Erased)

    def setup(self, engine: Engine, head: Checkpoint) -> None:
        install_outbox(engine, head)

    def define_tables(self, metadata: MetaData, suffix: str) -> dict[str, Table]:
        # Per generation: whom each order's emails go to (a customer id; none: no address).
        table = Table(
            f"outbox_order_contacts{suffix}",
            metadata,
            Column("order_id", String(36), primary_key=True),
            Column("customer_id", String(128), index=True),
        )
        return {"outbox_order_contacts": table}

    def batch(self, conn: Connection, tables: dict[str, Table]) -> Batch:
        return OutboxBatch(conn, tables)


class OutboxBatch(Batch):
    """Folds a batch of events into outbox rows."""

    def __init__(self, conn: Connection, tables: dict[str, Table]) -> None:
        super().__init__(conn, tables)
        self.contacts_table = tables["outbox_order_contacts"]
        self.contacts: dict[str, str | None] = {}
        self.new_contacts: dict[str, str | None] = {}
        self.rows: list[dict[str, Any]] = []
        self.erasures: list[tuple[str, int]] = []
        self.subscriptions: list[Subscription] = []
        self.watermark = START
        self.last = START
        self.now = 0.0

    def load(self, events: Sequence[RecordedEvent]) -> None:
        # Locked until the batch commits: a subscription being added waits for us, or we see it.
        self.watermark = watermark_of(
            self.conn.execute(
                select(watermarks)
                .where(watermarks.c.name == OutboxProjection.name)
                .with_for_update()
            ).one()
        )
        self.now = float(self.conn.execute(select(db_now(self.conn.dialect.name))).scalar_one())
        self.subscriptions = load_subscriptions(self.conn)
        ids = list({str(r.event.originator_id) for r in events})
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            for row in self.conn.execute(
                select(self.contacts_table).where(self.contacts_table.c.order_id.in_(chunk))
            ):
                self.contacts[row.order_id] = row.customer_id

    def handle(self, recorded: RecordedEvent) -> None:
        self.last = recorded.checkpoint
        if isinstance(recorded.event, PersonalDataErasure.Erased):
            self.erasures.append((recorded.event.customer_id, recorded.position))
            return
        order_id = str(recorded.event.originator_id)
        self.on_event(recorded.event, order_id)
        if recorded.checkpoint <= self.watermark:
            return  # already recorded by an earlier generation: never twice
        email = self.contacts.get(order_id)
        self.rows.extend(effect_rows(recorded, self.subscriptions, email, self.now))

    @singledispatchmethod
    def on_event(self, event: object, order_id: str) -> None:
        """Only the placement matters for contacts; other events need nothing here."""

    @on_event.register
    def order_placed(self, event: Order.Placed, order_id: str) -> None:
        self.contacts[order_id] = self.new_contacts[order_id] = contact_of(event)

    def flush(self) -> None:
        if self.new_contacts:
            self.conn.execute(
                insert(self.contacts_table),
                [{"order_id": k, "customer_id": v} for k, v in self.new_contacts.items()],
            )
        insert_ignoring_duplicates(self.conn, self.rows)
        for customer_id, position in self.erasures:
            cancel_emails(self.conn, self.contacts_table, customer_id, before=position)
        if self.last > self.watermark:
            self.conn.execute(
                update(watermarks)
                .where(
                    watermarks.c.name == OutboxProjection.name,
                    tuple_(watermarks.c.tx_id, watermarks.c.position) < tuple_(*self.last),
                )
                .values(position=self.last.position, tx_id=self.last.tx)
            )
