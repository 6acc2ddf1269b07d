"""Who did what, on whose request: the metadata recorded with every event.

A caller states its context once (``acting_as``), whatever the entry point: the HTTP API with
the API key's principal and the request's ids, the command line with ``cli`` and the operating
system's user, a process manager with its component name. The ledger reads it when it records
a command and stores it, with an event id and the command's id as causation, in every event of
that command. Events recorded before this existed read as ``unknown`` (``metadata_of``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any
from uuid import uuid4

METADATA = "metadata"
"""The attribute of a stored event that holds its metadata (outside the event's own fields)."""

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Actor:
    """Who issued a command: an API key (``key``), the command line (``cli``), a component."""

    kind: str
    id: str
    name: str = ""
    role: str = ""


@dataclass(frozen=True)
class CommandContext:
    """The actor and the request behind the commands issued while it is current."""

    actor: Actor
    request_id: str | None = None
    correlation_id: str | None = None


NOBODY = CommandContext(Actor(UNKNOWN, UNKNOWN))
"""The context of a command issued with none stated (a library caller, a test)."""

_current: ContextVar[CommandContext] = ContextVar("orderledger_command_context", default=NOBODY)


@contextmanager
def acting_as(context: CommandContext) -> Iterator[CommandContext]:
    """Make ``context`` the one commands record, in this thread or task, until the block ends."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def current_context() -> CommandContext:
    return _current.get()


def new_metadata(context: CommandContext, command_id: str) -> dict[str, Any]:
    """The metadata of one event of a command: its own id, who, which request, and why."""
    return {
        "event_id": str(uuid4()),
        "actor": asdict(context.actor),
        "request_id": context.request_id or UNKNOWN,
        "correlation_id": context.correlation_id or context.request_id or command_id,
        "causation_id": command_id,
    }


def metadata_of(event: object) -> dict[str, Any]:
    """An event's metadata; an event recorded before metadata existed reads as unknown."""
    found = getattr(event, METADATA, None)
    if isinstance(found, dict):
        return found
    return {
        "event_id": UNKNOWN,
        "actor": asdict(NOBODY.actor),
        "request_id": UNKNOWN,
        "correlation_id": UNKNOWN,
        "causation_id": UNKNOWN,
    }
