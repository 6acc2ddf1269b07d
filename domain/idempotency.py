"""Idempotency records: a command's key and its first result, saved atomically with its events."""

from __future__ import annotations

from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

_NAMESPACE = UUID("6f1c1f3e-6a55-4c84-9d7e-0e5b7f0a9c41")


class IdempotencyRecord(Aggregate):
    """The first outcome of a command sent with an idempotency key."""

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


def record_id(key: str) -> UUID:
    """The aggregate id an idempotency key is recorded under (one record per key, ever)."""
    return uuid5(_NAMESPACE, key)
