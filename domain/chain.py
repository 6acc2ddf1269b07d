"""Tamper evidence: each aggregate's events form a hash chain; the whole sequence, a digest.

An event's hash is SHA-256 over the previous event's hash (of the same order) and the event as
stored: its aggregate id, version, topic and state bytes, which hold its metadata (who, which
request, why). It is computed as the event is written, from the previous event alone, so
writers of different orders never wait on each other. Changing an event's payload or metadata,
or its version, breaks its link; recomputing that link breaks the next one.

A chain cannot show that an order's last event, or a whole order, was deleted. The digest can:
SHA-256 folded over every chained event's position and hash in store order. The audit log
records it at checkpoints, handed out to be kept elsewhere; verify recomputes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from hashlib import sha256
from typing import Protocol
from uuid import UUID

GENESIS = bytes(32)
"""The "previous hash" of an aggregate's first chained event, and the digest of no events."""

ALGORITHM = "sha256-chain-v1"
"""Names how hashes and digests are computed, in exported checkpoints."""


class Storable(Protocol):
    """The stored form of an event (the library's StoredEvent)."""

    @property
    def originator_id(self) -> UUID | str: ...

    @property
    def originator_version(self) -> int: ...

    @property
    def topic(self) -> str: ...

    @property
    def state(self) -> bytes: ...


def event_hash(
    previous: bytes, originator_id: UUID | str, version: int, topic: str, state: bytes
) -> bytes:
    """The link of one stored event: its bytes chained to the previous event's hash."""
    topic_bytes = topic.encode()
    hashed = sha256(previous)
    hashed.update(_uuid(originator_id).bytes)
    hashed.update(version.to_bytes(8, "big"))
    hashed.update(len(topic_bytes).to_bytes(4, "big"))
    hashed.update(topic_bytes)
    hashed.update(state)
    return hashed.digest()


def chain_hashes(
    events: Sequence[Storable], previous: Callable[[UUID | str, int], bytes | None]
) -> list[bytes]:
    """The hash of each event about to be stored, in order.

    ``previous(originator_id, version)`` reads the stored hash of an earlier event; it is asked
    only for the event before an aggregate's first one here. An event stored before chaining
    began has none: the chain then starts afresh from ``GENESIS``.
    """
    last: dict[UUID | str, tuple[int, bytes]] = {}
    hashes = []
    for stored in events:
        version = stored.originator_version
        known = last.get(stored.originator_id)
        if known is not None and known[0] == version - 1:
            prior = known[1]
        elif version > 1:
            prior = previous(stored.originator_id, version - 1) or GENESIS
        else:
            prior = GENESIS
        link = event_hash(prior, stored.originator_id, version, stored.topic, stored.state)
        last[stored.originator_id] = (version, link)
        hashes.append(link)
    return hashes


def extend_digest(digest: bytes, position: int, link: bytes) -> bytes:
    """The digest of the sequence so far, after one more event at ``position``."""
    return sha256(digest + position.to_bytes(8, "big") + link).digest()


def _uuid(originator_id: UUID | str) -> UUID:
    return originator_id if isinstance(originator_id, UUID) else UUID(originator_id)
