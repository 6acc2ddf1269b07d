"""OrderLedger: the application service. One method per command, plus the audit reads."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from uuid import UUID, uuid4

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import (
    IntegrityError,
    JSONTranscoder,
    Notification,
    PersistenceError,
    Transcoding,
)
from eventsourcing.utils import Environment, EnvType

from domain.audit import METADATA, CommandContext, current_context, metadata_of, new_metadata
from domain.errors import (
    CommandOutcomeUnknownError,
    ConcurrencyConflictError,
    IdempotencyKeyReusedError,
    InvalidCommandError,
    OrderLedgerError,
    OrderNotFoundError,
    OrderRuleError,
)
from domain.eventstore import PositionedRecorder, event_store_env
from domain.idempotency import CommandKey
from domain.order import (
    EVENT_TYPES,
    MAX_ID_LENGTH,
    MAX_REASON_LENGTH,
    PERSONAL_FIELDS,
    Order,
    bounded_text,
)
from domain.personal import (
    MASTER_KEY_SETTING,
    SEALED,
    MasterKeyError,
    PersonalData,
    PersonalDataErasure,
    Sealed,
)

log = logging.getLogger("orderledger.ledger")

EVENT_NAMES: dict[type[Aggregate.Event], str] = {
    **{cls: name for name, cls in EVENT_TYPES.items()},
    PersonalDataErasure.Erased: "PersonalDataErased",
}
COMMAND_ID = "command_id"
"""Stored with every event a command records: after a failed save it tells the ledger's own
events (a lost commit acknowledgement) from another writer's."""
MAX_IDEMPOTENCY_KEY_LENGTH = 255
# Without an expected version a command that loses a race re-runs against the new state.
# Every lost race means another command was recorded, so with N writers on one order a
# command needs at most N - 1 retries; the budget covers a busy order with room to spare.
_UNCONDITIONAL_RETRIES = 20
_RETRY_BACKOFF_SECONDS = 0.002

CommandObserver = Callable[[str, str, float], None]
"""Told of every command once it finishes: (command, outcome, seconds taken)."""

_OUTCOMES: tuple[tuple[type[Exception], str], ...] = (
    (ConcurrencyConflictError, "conflict"),
    (OrderNotFoundError, "not_found"),
    (InvalidCommandError, "rejected"),
    (OrderRuleError, "rejected"),
    (IdempotencyKeyReusedError, "rejected"),
)


@dataclass(frozen=True)
class CommandResult:
    """What a command did: the order, its new version and the global position of its last event."""

    order_id: UUID
    version: int
    position: int
    replayed: bool = False
    """True when an idempotency key returned the first result instead of recording again."""


@dataclass(frozen=True)
class ErasureResult:
    """An erasure: recorded at ``position``, ``keys_erased`` data keys deleted."""

    customer_id: str
    position: int
    keys_erased: int


@dataclass(frozen=True)
class HistoryEntry:
    """One recorded event of an order, for audit."""

    position: int
    version: int
    type: str
    timestamp: datetime
    data: dict[str, Any]
    metadata: dict[str, Any]
    """Who recorded it and on whose request (domain/audit.py)."""


class OrderLedger(Application[UUID]):
    """Places and changes orders, and reads back their full history."""

    name = "OrderLedger"

    def __init__(self, env: EnvType | None = None, *, personal: PersonalData | None = None) -> None:
        self.personal = personal
        """Seals and opens personal data; without it, none may be recorded or read."""
        super().__init__(env)
        self.command_observers: list[CommandObserver] = []
        """Hooks (e.g. metrics) told of each command, so every caller's commands count alike."""

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(_SealedTranscoding(self))

    def close(self) -> None:
        super().close()
        if self.personal is not None:
            self.personal.close()

    def construct_env(self, name: str, env: EnvType | None = None) -> Environment:
        """Only the settings we pass: the library would merge ``os.environ`` over its defaults,
        so a stray ``POSTGRES_ENABLE_DB_FUNCTIONS=y`` (no table lock: readers skip events) or
        ``ORDERLEDGER_PERSISTENCE_MODULE`` would change what the store guarantees."""
        return Environment(name, {**type(self).env, **(env or {})})

    @classmethod
    def from_url(cls, database_url: str, *, personal: PersonalData | None = None) -> OrderLedger:
        """Open the ledger on a ``sqlite:///`` or ``postgresql://`` store, creating tables."""
        return cls(env=event_store_env(database_url), personal=personal)

    @property
    def store(self) -> PositionedRecorder:
        return cast(PositionedRecorder, self.recorder)

    # -- commands -----------------------------------------------------------------------------

    def place_order(
        self,
        *,
        customer_id: str,
        currency: str,
        lines: Sequence[Mapping[str, Any]],
        shipping_address: str | None = None,
        client_reference: str | None = None,
        customer_email: str | None = None,
        idempotency_key: str | None = None,
    ) -> CommandResult:
        """Place a new order."""
        args = {
            "customer_id": customer_id,
            "currency": currency,
            "lines": [dict(line) for line in lines],
            "shipping_address": shipping_address,
            "client_reference": client_reference,
            "customer_email": customer_email,
        }
        return self._execute("place_order", None, args, None, idempotency_key)

    def add_line(
        self,
        order_id: UUID,
        *,
        sku: str,
        quantity: int,
        unit_price: int,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
    ) -> CommandResult:
        """Add a line to an order that has no payment yet."""
        args = {"sku": sku, "quantity": quantity, "unit_price": unit_price}
        return self._execute("add_line", order_id, args, expected_version, idempotency_key)

    def remove_line(
        self,
        order_id: UUID,
        *,
        sku: str,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
    ) -> CommandResult:
        """Remove a line from an order that has no payment yet."""
        return self._execute(
            "remove_line", order_id, {"sku": sku}, expected_version, idempotency_key
        )

    def capture_payment(
        self,
        order_id: UUID,
        *,
        amount: int,
        payment_reference: str,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
    ) -> CommandResult:
        """Capture part or all of an order's balance."""
        args = {"amount": amount, "payment_reference": payment_reference}
        return self._execute("capture_payment", order_id, args, expected_version, idempotency_key)

    def ship_order(
        self,
        order_id: UUID,
        *,
        carrier: str,
        tracking_number: str,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
    ) -> CommandResult:
        """Ship a fully paid order."""
        args = {"carrier": carrier, "tracking_number": tracking_number}
        return self._execute("ship", order_id, args, expected_version, idempotency_key)

    def deliver_order(
        self,
        order_id: UUID,
        *,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
    ) -> CommandResult:
        """Record a shipped order's delivery."""
        return self._execute("deliver", order_id, {}, expected_version, idempotency_key)

    def cancel_order(
        self,
        order_id: UUID,
        *,
        reason: str,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
    ) -> CommandResult:
        """Cancel an order that has not shipped."""
        return self._execute(
            "cancel", order_id, {"reason": reason}, expected_version, idempotency_key
        )

    def issue_refund(
        self,
        order_id: UUID,
        *,
        amount: int,
        reason: str,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
    ) -> CommandResult:
        """Refund money captured on an order."""
        args = {"amount": amount, "reason": reason}
        return self._execute("issue_refund", order_id, args, expected_version, idempotency_key)

    def erase_customer(self, customer_id: str, *, reason: str) -> ErasureResult:
        """Erase a customer's personal data: record who asked and why, then delete the
        customer's data keys, so every sealed value of theirs reads as erased from then on.

        Safe to repeat: a second erasure finds no keys and records that it was asked again.
        """
        customer_id = bounded_text(customer_id, name="customer_id", max_length=MAX_ID_LENGTH)
        reason = bounded_text(reason, name="reason", max_length=MAX_REASON_LENGTH, multiline=True)
        if self.personal is None:
            raise MasterKeyError(f"{MASTER_KEY_SETTING} is not configured: nothing to erase with")
        erasure = PersonalDataErasure(customer_id=customer_id, reason=reason)
        _stamp(erasure, str(uuid4()), current_context())
        recordings = self.save(erasure)
        keys = self.personal.erase(customer_id)
        log.info("personal data erased", extra={"keys_erased": keys})
        return ErasureResult(customer_id, recordings[-1].notification.id, keys)

    # -- reads --------------------------------------------------------------------------------

    def get_order(self, order_id: UUID, *, version: int | None = None) -> Order:
        """The order now, or as it was at a version."""
        if version is not None and version < 1:
            raise InvalidCommandError("version must be 1 or more")
        try:
            order: Aggregate = self.repository.get(order_id, version=version)
        except AggregateNotFoundError:
            raise OrderNotFoundError(f"order {order_id} not found") from None
        if not isinstance(order, Order):
            raise OrderNotFoundError(f"order {order_id} not found")
        if version is not None and order.version < version:
            raise OrderNotFoundError(
                f"order {order_id} has no version {version} (latest is {order.version})"
            )
        return order

    def order_history(self, order_id: UUID) -> list[HistoryEntry]:
        """Every event of the order, oldest first, with its global position."""
        entries = []
        for notification in self.store.select_aggregate_notifications(order_id):
            entry = self.history_entry(notification)
            if entry is None:
                raise OrderNotFoundError(f"order {order_id} not found")
            entries.append(entry)
        if not entries:
            raise OrderNotFoundError(f"order {order_id} not found")
        return entries

    def history_entry(self, notification: Notification) -> HistoryEntry | None:
        """One stored event as an audit entry (None if it is not an order event)."""
        domain_event = cast(Aggregate.Event, self.mapper.to_domain_event(notification))
        event_name = EVENT_NAMES.get(type(domain_event))
        if event_name is None:
            return None
        return HistoryEntry(
            position=notification.id,
            version=notification.originator_version,
            type=event_name,
            timestamp=domain_event.timestamp,
            data=_event_data(domain_event),
            metadata=metadata_of(domain_event),
        )

    def order_as_of(
        self, order_id: UUID, *, version: int | None = None, at: datetime | None = None
    ) -> Order:
        """The order as it was at a version, or at a moment in time (timezone-aware)."""
        if version is not None and at is not None:
            raise InvalidCommandError("give either a version or a moment, not both")
        if at is None:
            return self.get_order(order_id, version=version)
        if at.tzinfo is None:
            raise InvalidCommandError("the moment must include a timezone, e.g. 2026-01-31T12:00Z")
        history = self.order_history(order_id)
        versions = [entry.version for entry in history if entry.timestamp <= at]
        if not versions:
            raise OrderNotFoundError(f"order {order_id} did not exist yet at {at.isoformat()}")
        return self.get_order(order_id, version=versions[-1])

    def head_position(self) -> int:
        """The global position of the newest event in the store (0 when empty)."""
        return self.store.max_notification_id() or 0

    # -- the one path every command takes -------------------------------------------------------

    def _execute(
        self,
        command: str,
        order_id: UUID | None,
        args: dict[str, Any],
        expected_version: int | None,
        idempotency_key: str | None,
    ) -> CommandResult:
        """Run the command and tell the observers how it ended and how long it took."""
        started = time.perf_counter()
        try:
            result = self._run(command, order_id, args, expected_version, idempotency_key)
        except Exception as error:
            self._tell_observers(command, _outcome_of(error), time.perf_counter() - started)
            raise
        outcome = "replayed" if result.replayed else "ok"
        self._tell_observers(command, outcome, time.perf_counter() - started)
        return result

    def _tell_observers(self, command: str, outcome: str, seconds: float) -> None:
        for observer in self.command_observers:
            # The command's outcome stands whatever an observer does; a broken hook is logged.
            try:
                observer(command, outcome, seconds)
            except Exception:
                log.exception("command observer %r failed", observer)

    def _run(
        self,
        command: str,
        order_id: UUID | None,
        args: dict[str, Any],
        expected_version: int | None,
        idempotency_key: str | None,
    ) -> CommandResult:
        fingerprint = None
        if idempotency_key is not None:
            if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
                raise InvalidCommandError(
                    f"idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters"
                )
            fingerprint = _fingerprint(command, order_id, args)
        # A key is looked up only when the command fails: recorded once already, its repeat
        # either breaks a rule now (paid twice, say) or collides with its unique record.
        retries = _UNCONDITIONAL_RETRIES if expected_version is None else 0
        attempt = 0
        command_id = str(uuid4())
        context = current_context()
        while True:
            try:
                order, read_version = self._apply(command, order_id, args, expected_version)
            except OrderLedgerError:
                if idempotency_key is None or fingerprint is None:
                    raise
                earlier = self._recorded_result(idempotency_key, fingerprint)
                if earlier is None:
                    raise
                return earlier
            command_key = None
            if idempotency_key is not None and fingerprint is not None:
                command_key = CommandKey(idempotency_key, fingerprint, order.id, order.version)
            _stamp(order, command_id, context)
            try:
                recordings = self.save(order, command_key=command_key)
            except PersistenceError as error:
                recorded = self._recorded_despite(
                    error, command_id, order, read_version, idempotency_key, fingerprint
                )
                if recorded is not None:
                    return recorded
                current = self._current_version(order_id)
                if order_id is None or current == read_version:
                    # Nothing else was recorded on the order (a new one has a fresh id), so
                    # no race was lost: the store refused the write, and that is no conflict.
                    raise
                if attempt < retries:
                    attempt += 1
                    # A random pause stops the same losers from colliding again in lockstep.
                    time.sleep(random.uniform(0, _RETRY_BACKOFF_SECONDS * min(attempt, 10)))
                    continue
                raise ConcurrencyConflictError(
                    f"order {order_id} changed while the command ran "
                    f"(now at version {current}); nothing was recorded",
                    current_version=current,
                ) from None
            position = max(
                r.notification.id for r in recordings if r.domain_event.originator_id == order.id
            )
            return CommandResult(order_id=order.id, version=order.version, position=position)

    def save(self, *objs: Any, **kwargs: Any) -> Any:
        """The library's save, with every order's personal values sealed first, whoever saves.

        A data key made for a new customer is stored by the same transaction as the events it
        sealed (``data_keys``, for the recorder): no commit of its own, and never a key without
        its events or events without their key.
        """
        for obj in objs:
            if isinstance(obj, Order):
                self.seal(obj)
        if self.personal is None:
            return super().save(*objs, **kwargs)
        with self.personal.collecting() as new_keys:
            recordings = super().save(*objs, data_keys=new_keys.rows, **kwargs)
        self.personal.committed(new_keys)
        return recordings

    def seal(self, order: Order) -> None:
        """Replace each personal value of the order's pending events by a Sealed one: the
        transcoder encrypts it with the customer's data key as the event is stored."""
        for pending_event in order.pending_events:
            for field in PERSONAL_FIELDS.get(type(pending_event), ()):
                value = getattr(pending_event, field, None)
                if not isinstance(value, str):
                    continue
                if self.personal is None:
                    raise MasterKeyError(
                        f"{MASTER_KEY_SETTING} is not configured: personal data ({field}) "
                        "is never recorded unencrypted"
                    )
                object.__setattr__(pending_event, field, Sealed(order.customer_id, value))

    def _recorded_despite(
        self,
        error: PersistenceError,
        command_id: str,
        order: Order,
        read_version: int,
        idempotency_key: str | None,
        fingerprint: str | None,
    ) -> CommandResult | None:
        """After a failed save: the result recorded for the command anyway, or None when the
        save lost a race; any other failure that recorded nothing is raised again."""
        # The store may have committed before the failure reached us (a connection lost
        # after COMMIT, then the library's retry meeting our own rows).
        recorded = self._recorded_by(command_id, order.id, read_version, order.version)
        if recorded is not None:
            return recorded
        if not isinstance(error, IntegrityError):
            raise error
        if idempotency_key is not None and fingerprint is not None:
            return self._recorded_result(idempotency_key, fingerprint)
        return None

    def _recorded_by(
        self, command_id: str, order_id: UUID, read_version: int, version: int
    ) -> CommandResult | None:
        """The command's result if the store holds its events, None if it holds none of them.

        A command's events and its idempotency key are one transaction: the first of its
        events answers for all of them.
        """
        try:
            stored = self.store.select_aggregate_notifications(order_id, lte_version=version)
        except PersistenceError as error:
            raise CommandOutcomeUnknownError(
                f"the event store failed while recording the command and could not be asked "
                f"whether it was recorded ({type(error).__name__}); read order {order_id} "
                "or retry with the same Idempotency-Key"
            ) from error
        ours = [n for n in stored if n.originator_version > read_version]
        if not ours or ours[0].originator_version != read_version + 1:
            return None
        first = self.mapper.to_domain_event(ours[0])
        if getattr(first, COMMAND_ID, None) != command_id or ours[-1].originator_version != version:
            return None
        return CommandResult(order_id=order_id, version=version, position=ours[-1].id)

    def _apply(
        self,
        command: str,
        order_id: UUID | None,
        args: dict[str, Any],
        expected_version: int | None,
    ) -> tuple[Order, int]:
        """The order with the command's events pending, and the version it was read at."""
        if order_id is None:
            return Order.place(**args), 0
        order = self.get_order(order_id)
        read_version = order.version
        if expected_version is not None and order.version != expected_version:
            raise ConcurrencyConflictError(
                f"order {order_id} is at version {order.version}, "
                f"not the expected {expected_version}; nothing was recorded",
                current_version=order.version,
            )
        _COMMANDS[command](order, args)
        return order, read_version

    def _recorded_result(self, key: str, fingerprint: str) -> CommandResult | None:
        record = self.store.command_key(key)
        if record is None:
            return None
        if record.fingerprint != fingerprint:
            raise IdempotencyKeyReusedError(
                f"idempotency key {key!r} was already used for a different command"
            )
        notifications = self.store.select_aggregate_notifications(
            record.order_id, lte_version=record.order_version
        )
        return CommandResult(
            order_id=record.order_id,
            version=record.order_version,
            position=notifications[-1].id,
            replayed=True,
        )

    def _current_version(self, order_id: UUID | None) -> int | None:
        if order_id is None:
            return None
        try:
            return self.get_order(order_id).version
        except OrderNotFoundError:
            return None


_COMMANDS: dict[str, Callable[[Order, dict[str, Any]], None]] = {
    "add_line": lambda order, a: order.add_line(**a),
    "remove_line": lambda order, a: order.remove_line(**a),
    "capture_payment": lambda order, a: order.capture_payment(**a),
    "ship": lambda order, a: order.ship(**a),
    "deliver": lambda order, a: order.deliver(),
    "cancel": lambda order, a: order.cancel(**a),
    "issue_refund": lambda order, a: order.issue_refund(**a),
}


def _stamp(aggregate: Aggregate, command_id: str, context: CommandContext) -> None:
    """Give every pending event of a command its command id and metadata. Events are frozen:
    both ride in the stored state, outside the event's fields."""
    for pending_event in aggregate.pending_events:
        object.__setattr__(pending_event, COMMAND_ID, command_id)
        object.__setattr__(pending_event, METADATA, new_metadata(context, command_id))


class _SealedTranscoding(Transcoding):
    """Personal values, stored sealed with their customer's key; read back as the text, or
    ``ERASED`` once the customer's keys were erased."""

    type = Sealed
    name = SEALED

    def __init__(self, ledger: OrderLedger) -> None:
        self._ledger = ledger

    def encode(self, obj: Sealed) -> dict[str, str]:
        return self._personal().seal(obj.customer_id, obj.text)

    def decode(self, data: dict[str, Any]) -> str:
        return self._personal().open(data)

    def _personal(self) -> PersonalData:
        if self._ledger.personal is None:
            raise MasterKeyError(
                f"{MASTER_KEY_SETTING} is not configured: personal data cannot be read"
            )
        return self._ledger.personal


def _outcome_of(error: Exception) -> str:
    """The outcome label of a command that raised: what the caller did wrong, or an error."""
    for kind, outcome in _OUTCOMES:
        if isinstance(error, kind):
            return outcome
    return "error"


_FINGERPRINT_JSON = json.JSONEncoder(sort_keys=True, default=str)
"""What json.dumps(sort_keys=True, default=str) builds on every call: keys recorded by every
version are fingerprints of this exact text, so it never changes."""


def _fingerprint(command: str, order_id: UUID | None, args: dict[str, Any]) -> str:
    body = _FINGERPRINT_JSON.encode(
        {"command": command, "order_id": str(order_id) if order_id else None, "args": args}
    )
    return hashlib.sha256(body.encode()).hexdigest()


def _event_data(domain_event: object) -> dict[str, Any]:
    skip = {
        "originator_id",
        "originator_version",
        "timestamp",
        "originator_topic",
        COMMAND_ID,
        METADATA,
    }
    data: dict[str, Any] = {}
    for key, value in vars(domain_event).items():
        if key in skip:
            continue
        if isinstance(value, UUID):
            data[key] = str(value)
        elif isinstance(value, datetime):
            data[key] = value.isoformat()
        else:
            data[key] = value
    return data
