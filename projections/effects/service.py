"""Managing side effects: webhook subscriptions, the outbox's contents, retries and reconciling."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import Engine, select, update

from domain.eventstore import START
from domain.order import EVENT_TYPES, Order
from projections.effects.outbox import (
    DEAD,
    PENDING,
    STATUSES,
    OutboxProjection,
    Subscription,
    attempts,
    contact_of,
    destination_of,
    effect_rows,
    effects,
    insert_ignoring_duplicates,
    installed_at,
    load_subscriptions,
    subscription_of,
    subscriptions,
    watermark_of,
    watermarks,
)
from projections.effects.senders import new_secret
from projections.effects.tally import read_counts
from projections.effects.targets import TargetNotAllowedError, TargetPolicy
from projections.engine.database import db_now, write_transaction
from projections.engine.source import EventSource

MAX_URL_LENGTH = 2048


def status_totals(by_destination: dict[str, dict[str, int]]) -> dict[str, int]:
    """How many effects are in each status, from ``Effects.by_destination``."""
    total: Counter[str] = Counter()
    for by_status in by_destination.values():
        total.update(by_status)
    return {status: total[status] for status in STATUSES}


class EffectNotFoundError(LookupError):
    """No effect (or subscription) has that id."""


class InvalidSubscriptionError(ValueError):
    """The subscription's URL or event types are not acceptable."""


class EffectNotDeadError(ValueError):
    """Only a dead effect can be retried; this one is pending or delivered."""


@dataclass(frozen=True)
class CreatedSubscription:
    subscription: Subscription
    secret: str
    """Shown once, at creation; never returned again."""


@dataclass(frozen=True)
class SubscriptionView:
    """A subscription as operators see it: everything but the secret."""

    id: str
    url: str
    event_types: list[str]
    active: bool
    created_at: float


@dataclass(frozen=True)
class EffectView:
    """One outbox row with its attempts, for operators."""

    id: str
    effect: str
    kind: str
    position: int
    order_id: str
    event_type: str
    target: str
    status: str
    attempts: int
    total_attempts: int
    next_attempt_at: float
    created_at: float
    delivered_at: float | None
    last_error: str | None
    history: list[dict[str, object]]


class Effects:
    """Operations on the outbox and the webhook subscriptions."""

    def __init__(
        self, engine: Engine, source: EventSource, targets: TargetPolicy | None = None
    ) -> None:
        self.engine = engine
        self.source = source
        self.targets = targets or TargetPolicy()
        """Where subscriptions may point (public addresses only unless networks are allowed)."""
        self.now = db_now(engine.dialect.name)

    # -- subscriptions -----------------------------------------------------------------------

    def add_subscription(self, url: str, event_types: list[str]) -> CreatedSubscription:
        """Subscribe a URL to event types (``*`` for all); it receives events recorded from now."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or len(url) > MAX_URL_LENGTH:
            raise InvalidSubscriptionError(f"{url!r} is not an http(s) URL")
        try:
            self.targets.check_url(url)
        except TargetNotAllowedError as error:
            raise InvalidSubscriptionError(str(error)) from None
        types = sorted(set(event_types)) or ["*"]
        unknown = [t for t in types if t != "*" and t not in EVENT_TYPES]
        if unknown:
            known = ", ".join(sorted(EVENT_TYPES))
            raise InvalidSubscriptionError(f"unknown event types {unknown}; known: {known}, *")
        secret = new_secret()
        head = self.source.safe_head()
        with write_transaction(self.engine) as conn:
            # Take turns with outbox batches (they lock the same row): a batch either sees this
            # subscription, or it committed first and the subscription starts after it.
            row = conn.execute(
                select(watermarks)
                .where(watermarks.c.name == OutboxProjection.name)
                .with_for_update()
            ).first()
            created = max(head, watermark_of(row)) if row is not None else head
            # Taken once batches are held off: what a batch already applied had ended.
            subscription = Subscription(
                id=str(uuid.uuid4()),
                url=url,
                event_types=types,
                active=True,
                created_position=created.position,
                created_tx=created.tx,
                created_snapshot=self.source.snapshot(),
            )
            conn.execute(
                subscriptions.insert().values(
                    id=subscription.id,
                    url=url,
                    event_types=json.dumps(types),
                    secret=secret,
                    active=True,
                    created_at=self.now,
                    created_position=subscription.created_position,
                    created_tx_id=subscription.created_tx,
                    created_snapshot=(
                        None
                        if subscription.created_snapshot is None
                        else str(subscription.created_snapshot)
                    ),
                )
            )
        return CreatedSubscription(subscription, secret)

    def subscriptions(self, *, include_inactive: bool = False) -> list[Subscription]:
        with self.engine.connect() as conn:
            if not include_inactive:
                return load_subscriptions(conn)
            return [
                subscription_of(row)
                for row in conn.execute(select(subscriptions).order_by(subscriptions.c.created_at))
            ]

    def subscription_views(
        self, *, include_inactive: bool = False, subscription_id: str | None = None
    ) -> list[SubscriptionView]:
        """Subscriptions, oldest first, without their secrets."""
        query = select(
            subscriptions.c.id,
            subscriptions.c.url,
            subscriptions.c.event_types,
            subscriptions.c.active,
            subscriptions.c.created_at,
        ).order_by(subscriptions.c.created_at, subscriptions.c.id)
        if not include_inactive:
            query = query.where(subscriptions.c.active.is_(True))
        if subscription_id is not None:
            query = query.where(subscriptions.c.id == subscription_id)
        with self.engine.connect() as conn:
            return [
                SubscriptionView(
                    id=row.id,
                    url=row.url,
                    event_types=json.loads(row.event_types),
                    active=row.active,
                    created_at=row.created_at,
                )
                for row in conn.execute(query)
            ]

    def subscription_view(self, subscription_id: str) -> SubscriptionView:
        found = self.subscription_views(include_inactive=True, subscription_id=subscription_id)
        if not found:
            raise EffectNotFoundError(f"no subscription {subscription_id!r}")
        return found[0]

    def remove_subscription(self, subscription_id: str) -> None:
        """Stop recording effects for it (deliveries already recorded still go out)."""
        with write_transaction(self.engine) as conn:
            result = conn.execute(
                update(subscriptions)
                .where(subscriptions.c.id == subscription_id, subscriptions.c.active.is_(True))
                .values(active=False)
            )
        if result.rowcount != 1:
            raise EffectNotFoundError(f"no active subscription {subscription_id!r}")

    def secret_for(self, subscription_id: str) -> str | None:
        with self.engine.connect() as conn:
            secret: str | None = conn.execute(
                select(subscriptions.c.secret).where(subscriptions.c.id == subscription_id)
            ).scalar_one_or_none()
        return secret

    # -- the outbox ----------------------------------------------------------------------------

    def find(self, *, status: str | None = None, limit: int = 100) -> list[EffectView]:
        query = select(effects).order_by(effects.c.position, effects.c.effect).limit(limit)
        if status is not None:
            query = query.where(effects.c.status == status)
        with self.engine.connect() as conn:
            rows = list(conn.execute(query))
        return [self._view(row, []) for row in rows]

    def dead_letters(self, *, limit: int = 100) -> list[EffectView]:
        """Dead effects by order, then position, each with every attempt."""
        query = (
            select(effects)
            .where(effects.c.status == DEAD)
            .order_by(effects.c.order_id, effects.c.position, effects.c.effect)
            .limit(limit)
        )
        history: dict[str, list[dict[str, object]]] = {}
        with self.engine.connect() as conn:
            rows = list(conn.execute(query))
            ids = [row.id for row in rows]
            for start in range(0, len(ids), 500):
                for attempt in conn.execute(
                    select(attempts)
                    .where(attempts.c.effect_id.in_(ids[start : start + 500]))
                    .order_by(attempts.c.effect_id, attempts.c.attempt)
                ):
                    history.setdefault(attempt.effect_id, []).append(dict(attempt._mapping))
        return [self._view(row, history.get(row.id, [])) for row in rows]

    def get(self, identifier: str) -> EffectView:
        with self.engine.connect() as conn:
            row = conn.execute(select(effects).where(effects.c.id == identifier)).first()
            if row is None:
                raise EffectNotFoundError(f"no effect {identifier!r}")
            history = [
                dict(r._mapping)
                for r in conn.execute(
                    select(attempts)
                    .where(attempts.c.effect_id == identifier)
                    .order_by(attempts.c.attempt)
                )
            ]
        return self._view(row, history)

    def counts(self) -> dict[str, int]:
        """How many effects are in each status (kept by the database: no rows are read)."""
        return status_totals(self.by_destination())

    def by_destination(self) -> dict[str, dict[str, int]]:
        """How many effects each destination (``destination_of``) has in each status."""
        found = read_counts(self.engine)
        return {
            destination: {status: found[destination][status] for status in STATUSES}
            for destination in sorted(found)
        }

    def retry(self, identifier: str) -> EffectView:
        """Send a dead effect again (with a fresh set of attempts); its history is kept."""
        with write_transaction(self.engine) as conn:
            result = conn.execute(
                update(effects)
                .where(effects.c.id == identifier, effects.c.status == DEAD)
                .values(status=PENDING, attempts=0, next_attempt_at=self.now, last_error=None)
            )
        if result.rowcount != 1:
            status = self.get(identifier).status  # raises if unknown
            raise EffectNotDeadError(
                f"effect {identifier!r} is {status}, not dead; only dead effects retry"
            )
        return self.get(identifier)

    def retry_all_dead(self, *, target: str | None = None) -> int:
        """Send every dead effect (of one target or destination, if given) again; returns how
        many. "email" names every email; "email:<customer id>" one customer's."""
        condition = effects.c.status == DEAD
        if target is not None:
            condition = condition & (
                (effects.c.target == target) | (destination_of(effects) == target)
            )
        with write_transaction(self.engine) as conn:
            result = conn.execute(
                update(effects)
                .where(condition)
                .values(status=PENDING, attempts=0, next_attempt_at=self.now, last_error=None)
            )
        return int(result.rowcount)

    def reconcile(self, *, page: int = 2000) -> int:
        """Record effects that events up to the high-water mark should have and do not.

        After a restore of the read-model database from an older backup, say. In a healthy
        system it records nothing. Returns how many effects it recorded.
        """
        with self.engine.connect() as conn:
            mark = conn.execute(
                select(watermarks).where(watermarks.c.name == OutboxProjection.name)
            ).first()
            if mark is None:
                return 0
            active = load_subscriptions(conn)
            now = float(conn.execute(select(self.now)).scalar_one())
        contacts: dict[str, str | None] = {}
        missing = 0
        position = START
        until, installed = watermark_of(mark), installed_at(mark)
        while position < until:
            batch = self.source.read(position, page)
            rows = []
            for recorded in batch.events:
                if recorded.checkpoint > until:
                    break
                event = recorded.event
                order_id = str(event.originator_id)
                if isinstance(event, Order.Placed):
                    contacts[order_id] = contact_of(event)
                if recorded.checkpoint <= installed:
                    continue
                rows += effect_rows(recorded, active, contacts.get(order_id), now)
            if rows:
                with write_transaction(self.engine) as conn:
                    missing += insert_ignoring_duplicates(conn, rows, count=True)
            if batch.checkpoint == position:
                break
            position = batch.checkpoint
        return missing

    @staticmethod
    def _view(row: object, history: list[dict[str, object]]) -> EffectView:
        values = row._mapping  # type: ignore[attr-defined]
        return EffectView(
            id=values["id"],
            effect=values["effect"],
            kind=values["kind"],
            position=values["position"],
            order_id=values["order_id"],
            event_type=values["event_type"],
            target=values["target"],
            status=values["status"],
            attempts=values["attempts"],
            total_attempts=values["total_attempts"],
            next_attempt_at=values["next_attempt_at"],
            created_at=values["created_at"],
            delivered_at=values["delivered_at"],
            last_error=values["last_error"],
            history=history,
        )
