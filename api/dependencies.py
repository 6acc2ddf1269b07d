"""Route dependencies as named aliases, so route signatures stay short."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, cast

from fastapi import Depends, Header, Request
from fastapi.exceptions import RequestValidationError

from domain.ledger import MAX_IDEMPOTENCY_KEY_LENGTH, OrderLedger
from domain.money import MAX_AMOUNT

_ENTITY_TAG = re.compile(r'"(\d{1,19})"')


def get_ledger(request: Request) -> OrderLedger:
    """The ledger the app opened at start-up."""
    return cast(OrderLedger, request.app.state.ledger)


LedgerDep = Annotated[OrderLedger, Depends(get_ledger)]

IdempotencyKeyDep = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description=f"1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters. A repeat with the same "
        "body returns the first response and records nothing; a different body is refused.",
    ),
]


def expected_version(
    if_match: Annotated[
        str | None,
        Header(
            alias="If-Match",
            description='The order\'s version as an entity tag, e.g. "3"; '
            "the command is refused with 412 if the order has moved on.",
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


def command_options(
    version: Annotated[int | None, Depends(expected_version)],
    idempotency_key: IdempotencyKeyDep = None,
) -> CommandOptions:
    """Collect If-Match and Idempotency-Key for a command."""
    return CommandOptions(expected_version=version, idempotency_key=idempotency_key)


CommandOptionsDep = Annotated[CommandOptions, Depends(command_options)]
