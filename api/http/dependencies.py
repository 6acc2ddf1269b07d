"""Route dependencies as named aliases, so route signatures stay short.

Dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency in its
thread pool, a hand-off that costs more than the dependency itself on every request.
"""

from __future__ import annotations

import email.message
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, cast

from fastapi import Depends, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from api.http.state import Held
from api.key_store import Principal
from api.logs import correlation_id
from domain.audit import Actor, CommandContext, acting_as
from domain.errors import InvalidCommandError
from domain.eventstore import Checkpoint, reached_at
from domain.ledger import OrderLedger
from domain.money import MAX_AMOUNT

_ENTITY_TAG = re.compile(r'"(\d{1,19})"')
_KEY_PATTERN = re.compile(r"^[\x21-\x7e]+$")


_ledger = Held[OrderLedger]("ledger")
get_ledger = _ledger.of
"""The ledger the app opened at start-up."""
LedgerDep = Annotated[OrderLedger, Depends(_ledger.dependency)]

MAX_IDEMPOTENCY_KEY_HEADER_LENGTH = 200
"""Room is left in the ledger's key for the caller's API key id, which scopes it."""
ANONYMOUS_SCOPE = "anonymous"

_IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        # Documented here, checked by idempotency_key() so the refusal names the rule.
        json_schema_extra={
            "minLength": 1,
            "maxLength": MAX_IDEMPOTENCY_KEY_HEADER_LENGTH,
            "pattern": _KEY_PATTERN.pattern,
        },
        description=f"1 to {MAX_IDEMPOTENCY_KEY_HEADER_LENGTH} visible ASCII characters, "
        "scoped to the API key sending it. A repeat with the same body returns the first "
        "response (with `Idempotent-Replayed: true`) and does nothing again; a different "
        "body is refused with 422. Kept at least 24 hours.",
        examples=["3f1c2a9e-order-77"],
    ),
]


def valid_idempotency_key(key: str) -> bool:
    """Whether an Idempotency-Key header is 1 to 200 visible ASCII characters."""
    return len(key) <= MAX_IDEMPOTENCY_KEY_HEADER_LENGTH and bool(_KEY_PATTERN.fullmatch(key))


async def idempotency_key(key: _IdempotencyKeyHeader = None) -> str | None:
    """The Idempotency-Key header, if it is 1 to 200 visible ASCII characters."""
    if key is not None and not valid_idempotency_key(key):
        raise InvalidCommandError(
            f"the idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_HEADER_LENGTH} "
            "visible ASCII characters"
        )
    return key


IdempotencyKeyHeader = Annotated[str | None, Depends(idempotency_key)]


def idempotency_scope(request: Request) -> str:
    """Whose keys these are: the authenticated API key's id (keys never cross callers)."""
    principal = getattr(request.state, "principal", None)
    key_id = getattr(principal, "key_id", None)
    return str(key_id) if key_id else ANONYMOUS_SCOPE


async def scoped_idempotency_key(request: Request, key: IdempotencyKeyHeader) -> str | None:
    """The Idempotency-Key as the ledger records it: prefixed with the caller's scope.

    Key ids are 16 characters, so a scoped key stays within the ledger's 255.
    """
    return None if key is None else scoped_key(idempotency_scope(request), key)


def scoped_key(scope: str, key: str) -> str:
    """An Idempotency-Key as the ledger records it, within its caller's scope."""
    return f"{scope}:{key}"


IdempotencyKeyDep = Annotated[str | None, Depends(scoped_idempotency_key)]


async def expected_version(
    if_match: Annotated[
        str | None,
        Header(
            alias="If-Match",
            description='The order\'s version as an entity tag, e.g. "3"; '
            "the command is refused with 412 if the order has moved on.",
            # Documented here, checked below so the refusal names the header.
            json_schema_extra={"pattern": r'^(\*|"[1-9][0-9]{0,18}")$'},
            examples=['"3"'],
        ),
    ] = None,
) -> int | None:
    """The version named by If-Match (``*`` or no header: any version)."""
    if if_match is None or if_match.strip() == "*":
        return None
    match = _ENTITY_TAG.fullmatch(if_match.strip())
    if match is None or not 1 <= int(match.group(1)) <= MAX_AMOUNT:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("header", "If-Match"),
                    "msg": 'If-Match must be "*" or one quoted order version, e.g. "3"',
                    "input": if_match,
                }
            ]
        )
    return int(match.group(1))


@dataclass(frozen=True)
class CommandOptions:
    """What a client may say about a command on an existing order besides its body."""

    expected_version: int | None
    idempotency_key: str | None

    def as_kwargs(self) -> dict[str, Any]:
        return {"expected_version": self.expected_version, "idempotency_key": self.idempotency_key}


async def command_options(
    version: Annotated[int | None, Depends(expected_version)],
    idempotency_key: IdempotencyKeyDep,
) -> CommandOptions:
    """Collect If-Match and Idempotency-Key for a command."""
    return CommandOptions(expected_version=version, idempotency_key=idempotency_key)


CommandOptionsDep = Annotated[CommandOptions, Depends(command_options)]


async def reachable_min_position(
    request: Request,
    min_position: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_AMOUNT,
            description="Wait until the read model has applied this global position "
            "(a command's `position`), or answer 503.",
        ),
    ] = None,
    header: Annotated[
        int | None,
        Header(alias="Orderledger-Min-Position", ge=0, le=MAX_AMOUNT),
    ] = None,
) -> Checkpoint | None:
    """Where the read model must be for the read to reflect a position (query string or
    header, the higher): the checkpoint of the event there. Refused if the store has not
    recorded that position yet.

    Positions come from command responses, so one beyond the newest event is a client error:
    waiting for it would only end in a 503 after the read timeout.
    """
    values = [value for value in (min_position, header) if value is not None]
    position = max(values) if values else None
    if position is None:
        return None
    ledger = get_ledger(request)

    def target() -> tuple[int, Checkpoint | None]:
        head = ledger.head_position()
        return head, None if position > head else reached_at(ledger.store, position)

    head, checkpoint = await run_in_threadpool(target)
    if checkpoint is None:
        raise RequestValidationError(
            [
                {
                    "type": "less_than_equal",
                    "loc": ("query", "min_position"),
                    "msg": f"no event is recorded at position {position} yet "
                    f"(the newest is at {head}); use a position a command returned",
                    "input": position,
                }
            ]
        )
    return checkpoint


ReachableMinPositionDep = Annotated[Checkpoint | None, Depends(reachable_min_position)]


def is_json_media_type(content_type: str) -> bool:
    """Whether a Content-Type declares JSON: ``application/json`` or ``application/*+json``.

    The rule FastAPI applies before it parses a body as JSON, read the same way (parameters
    and case ignored), so a body we let through is one the route will parse.
    """
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


async def json_body(request: Request) -> None:
    """Refuse a request body that is not declared JSON with 415, before anything parses it."""
    has_body = request.headers.get("content-length", "0") != "0" or (
        "transfer-encoding" in request.headers
    )
    if not has_body:
        return
    content_type = request.headers.get("content-type", "")
    if is_json_media_type(content_type):
        return
    media_type = content_type.split(";")[0].strip().lower()
    raise HTTPException(
        415,
        detail=f"the body must be JSON sent as Content-Type: application/json, "
        f"not {media_type or 'an undeclared type'}",
        headers={"Accept-Post": "application/json"},
    )


JSON_BODY = Depends(json_body)
"""A router dependency for routes that take a JSON body."""


def request_context(request: Request) -> CommandContext:
    """Who sends this request (its API key) and its request and correlation ids."""
    principal: Principal | None = getattr(request.state, "principal", None)
    actor = (
        Actor("key", principal.key_id, principal.name, str(principal.role))
        if principal is not None
        else Actor("anonymous", "anonymous")
    )
    request_id = cast(dict[str, Any], request.scope.get("state", {})).get("request_id")
    return CommandContext(actor, request_id, correlation_id(request.headers, request_id))


async def recorded_context(request: Request) -> AsyncIterator[CommandContext]:
    """The request's context for every command it issues (domain/audit.py)."""
    with acting_as(request_context(request)) as context:
        yield context
