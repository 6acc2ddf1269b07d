"""RFC 9457 problem details: the one place where errors become HTTP responses."""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from eventsourcing.persistence import PersistenceError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from api.http.schemas.commands import FieldError, Problem
from api.key_store import KeyNotFoundError
from api.logs import REQUEST_ID_HEADER
from domain.errors import (
    CommandOutcomeUnknownError,
    ConcurrencyConflictError,
    IdempotencyKeyReusedError,
    InvalidCommandError,
    OrderLedgerError,
    OrderNotFoundError,
    OrderRuleError,
)
from projections.effects.service import EffectNotFoundError
from projections.engine.runtime import ReadModelUpgradingError

log = logging.getLogger("orderledger.api")

PROBLEM_TYPE_BASE = "https://orderledger.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"

# First match wins, so subclasses with their own status come before their base classes.
_STATUS_BY_ERROR: tuple[tuple[type[OrderLedgerError], int], ...] = (
    (OrderNotFoundError, 404),
    (CommandOutcomeUnknownError, 503),
    (ConcurrencyConflictError, 409),
    (IdempotencyKeyReusedError, 422),
    (InvalidCommandError, 422),
    (OrderRuleError, 409),
)
_MAX_ERRORS_IN_DETAIL = 3
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def problem_response(
    request: Request,
    *,
    status: int,
    slug: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    errors: list[FieldError] | None = None,
    current_version: int | None = None,
) -> ProblemResponse:
    """A problem+json response about the request's path."""
    problem = Problem(
        type=PROBLEM_TYPE_BASE + slug,
        title=title,
        status=status,
        detail=detail,
        instance=request.url.path,
        errors=errors,
        current_version=current_version,
    )
    return ProblemResponse(
        problem.model_dump(mode="json", exclude_none=True), status_code=status, headers=headers
    )


RESPONSE_HEADERS: dict[str, dict[str, Any]] = {
    "Location": {
        "description": "Where the new resource (or the status of the started work) is read.",
        "schema": {"type": "string"},
    },
    "ETag": {
        "description": 'The order\'s version as an entity tag, e.g. "3": send it back as '
        "If-Match (commands) or If-None-Match (reads).",
        "schema": {"type": "string", "pattern": '^"[0-9]+"$'},
    },
    "Orderledger-Position": {
        "description": "Global position of the command's event: pass it as min_position to "
        "read your own write.",
        "schema": {"type": "integer", "minimum": 1},
    },
    "Idempotent-Replayed": {
        "description": "Present on a stored response replayed for a repeated Idempotency-Key; "
        "nothing was done again.",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 0},
    },
}
# Problems that tell the client when to try again.
_RETRY_STATUSES = frozenset({409, 503})


def response_headers(*names: str) -> dict[str, Any]:
    """An OpenAPI response entry fragment documenting these response headers."""
    return {"headers": {name: RESPONSE_HEADERS[name] for name in names}}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries declaring that these statuses answer with a problem document."""
    return {
        status: {
            "model": Problem,
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_MEDIA_TYPE: {}},
            **(response_headers("Retry-After") if status in _RETRY_STATUSES else {}),
        }
        for status in statuses
    }


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error the app can meet answer as problem+json."""
    app.add_exception_handler(OrderLedgerError, ledger_error_problem)
    app.add_exception_handler(RequestValidationError, validation_problem)
    app.add_exception_handler(StarletteHTTPException, http_problem)
    for missing in (KeyNotFoundError, EffectNotFoundError):
        app.add_exception_handler(missing, not_found_problem)
    app.add_exception_handler(PersistenceError, store_unavailable_problem)
    app.add_exception_handler(ReadModelUpgradingError, upgrading_problem)
    app.add_exception_handler(Exception, internal_error_problem)


async def ledger_error_problem(request: Request, exc: Exception) -> Response:
    """A refused command or read: the domain's own message is the detail."""
    assert isinstance(exc, OrderLedgerError)
    status = next((code for kind, code in _STATUS_BY_ERROR if isinstance(exc, kind)), 422)
    current_version = None
    if isinstance(exc, ConcurrencyConflictError):
        current_version = exc.current_version
        if "if-match" in request.headers:
            status = HTTPStatus.PRECONDITION_FAILED
    detail = str(exc)
    if isinstance(exc, IdempotencyKeyReusedError):
        # The ledger names the key with its caller's scope prefixed; the caller sent it bare.
        sent = request.headers.get("idempotency-key")
        detail = f"idempotency key {sent!r} was already used for a different command"
    words = _words(type(exc).__name__.removesuffix("Error"))
    return problem_response(
        request,
        status=status,
        slug="-".join(words),
        title=" ".join(words).capitalize(),
        detail=detail,
        current_version=current_version,
        headers={"Retry-After": "1"} if status == HTTPStatus.SERVICE_UNAVAILABLE else None,
    )


async def validation_problem(request: Request, exc: Exception) -> Response:
    """Input that does not fit the schema, including a body that is not JSON at all."""
    assert isinstance(exc, RequestValidationError)
    raw = list(exc.errors())
    malformed = next((error for error in raw if error.get("type") == "json_invalid"), None)
    if malformed is not None:
        reason = malformed.get("ctx", {}).get("error", "invalid JSON")
        position = malformed["loc"][-1]
        return problem_response(
            request,
            status=422,
            slug="malformed-json",
            title="Malformed JSON",
            detail=f"the request body is not valid JSON: {reason} at character {position}",
        )
    errors = [
        FieldError(
            loc=list(error["loc"]),
            field=".".join(str(part) for part in error["loc"]),
            message=str(error["msg"]),
        )
        for error in raw
    ]
    summary = "; ".join(f"{e.field}: {e.message}" for e in errors[:_MAX_ERRORS_IN_DETAIL])
    if len(errors) > _MAX_ERRORS_IN_DETAIL:
        summary += f" (and {len(errors) - _MAX_ERRORS_IN_DETAIL} more)"
    return problem_response(
        request,
        status=422,
        slug="invalid-request",
        title="Invalid request",
        detail=summary,
        errors=errors,
    )


async def not_found_problem(request: Request, exc: Exception) -> Response:
    """A key, effect or webhook subscription that does not exist: its message is the detail."""
    return await http_problem(request, StarletteHTTPException(404, detail=str(exc)))


async def http_problem(request: Request, exc: Exception) -> Response:
    """Routing and protocol errors (unknown path, wrong method, body too large, ...)."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == HTTPStatus.BAD_REQUEST and isinstance(exc.__cause__, ValueError):
        # FastAPI's answer to a body it cannot even decode (e.g. not UTF-8): still bad JSON.
        return problem_response(
            request,
            status=422,
            slug="malformed-json",
            title="Malformed JSON",
            detail=f"the request body is not valid JSON: {exc.__cause__}",
        )
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "Error"
    detail = exc.detail
    if detail == phrase and exc.status_code == HTTPStatus.NOT_FOUND:
        detail = f"nothing is served at {request.url.path}"
    headers = dict(exc.headers) if exc.headers else {}
    if exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
        headers["Allow"] = _allowed_methods(request)
        if detail == phrase:
            detail = f"{request.method} is not allowed on {request.url.path}"
    return problem_response(
        request,
        status=exc.status_code,
        slug="-".join(phrase.lower().split()),
        title=phrase.capitalize(),
        detail=str(detail),
        headers=headers or None,
    )


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at the path; routing names only the first route's."""
    return ", ".join(
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.router.routes
        )
    )


async def store_unavailable_problem(request: Request, exc: Exception) -> Response:
    """The event store refused or failed the write: nothing was recorded; retrying may work."""
    log.warning("event store failure on %s: %s", request.url.path, exc)
    return problem_response(
        request,
        status=503,
        slug="store-unavailable",
        title="Store unavailable",
        detail="the event store could not complete the request; nothing was recorded, retry",
        headers={"Retry-After": "1"},
    )


async def upgrading_problem(request: Request, exc: Exception) -> Response:
    """A read model built by another version, being rebuilt for this one: retry shortly."""
    return problem_response(
        request,
        status=503,
        slug="read-model-upgrading",
        title="Read model being rebuilt",
        detail=str(exc),
        headers={"Retry-After": "5"},
    )


async def internal_error_problem(request: Request, exc: Exception) -> Response:
    """A bug: say so without exposing anything about it (the server still logs it).

    Starlette answers it outside every middleware, so the request id the log middleware gave
    the request is put on the response here: the one thing that finds the failure in the log.
    """
    response = problem_response(
        request,
        status=500,
        slug="internal-error",
        title="Internal server error",
        detail="the server failed to complete the request; nothing about the failure is shown",
    )
    rid = request.scope.get("state", {}).get("request_id")
    if isinstance(rid, str):
        response.headers[REQUEST_ID_HEADER] = rid
    return response


def _words(camel: str) -> list[str]:
    return [word.lower() for word in re.findall(r"[A-Z][a-z0-9]*", camel)]
