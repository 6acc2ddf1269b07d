"""Idempotency keys: a command's key and its first result, stored atomically with its events.

A command sent with a key stores a row in the ``idempotency_keys`` table (``CommandKey``) in
the transaction that records its events; the key is unique, so a repeat collides and is
answered with the first result. Earlier versions stored each key as an aggregate of its own in
the events table (``IdempotencyRecord``): those events stay where they are, and are copied into
the table in the transaction that creates it.
"""

from __future__ import annotations

from typing import NamedTuple
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event
from eventsourcing.utils import get_topic

IDEMPOTENCY_TABLE = "idempotency_keys"


class CommandKey(NamedTuple):
    """The first outcome of a command sent with an idempotency key."""

    key: str
    fingerprint: str
    """What the command was (its name, order and arguments, hashed): a key sent again with
    another command is refused."""
    order_id: UUID
    order_version: int


class IdempotencyRecord(Aggregate):
    """How older versions stored a command's key: an aggregate of its own, one event."""

    class Recorded(Aggregate.Created):
        key: str
        fingerprint: str
        order_id: UUID
        order_version: int

    @staticmethod
    def create_id(key: str, **_: object) -> UUID:
        return record_id(key)

    @event(Recorded)
    def __init__(self, key: str, fingerprint: str, order_id: UUID, order_version: int) -> None:
        self.key = key
        self.fingerprint = fingerprint
        self.order_id = order_id
        self.order_version = order_version


LEGACY_RECORD_TOPIC = get_topic(IdempotencyRecord.Recorded)
"""The topic of the events older versions stored keys as (copied into the table once)."""


def record_id(key: str) -> UUID:
    """The aggregate id an older version recorded an idempotency key under."""
    return uuid5(_NAMESPACE, key)


_NAMESPACE = UUID("6f1c1f3e-6a55-4c84-9d7e-0e5b7f0a9c41")
