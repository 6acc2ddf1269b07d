"""The two requests an order service answers most, served without FastAPI's per-request work.

Reading one order (``GET /orders/{id}``) and placing one (``POST /orders``) dominate an order
service's traffic, and for them FastAPI's dependency resolution, routing and thread hand-offs
cost several times the work itself (docs/benchmarks.md, "HTTP API"). These shortcuts answer
the plain, valid case of each with the status, body and headers the route gives
(``tests/integration/api/test_shortcuts.py`` compares them):

- a key this process accepted within its cache time, with the route's role;
- GET: an order id in canonical form, no other query than ``min_position`` (already reached),
  an order that exists; read with one statement of a ``PointReader``;
- POST: a JSON body the route's own model accepts, an optional well-formed Idempotency-Key;
  placed by the same ``OrderLedger.place_order`` call, its refusals answered by the app's own
  problem handlers.

Everything else (no key, a key not seen lately, too low a role, an unknown order, a
``min_position`` not reached yet, any other query or header the route would refuse, a body it
would refuse, ...) goes on to the route, untouched: a body already read is handed on as it came.
The route stays the one place that decides errors and documents the operation in OpenAPI.

The placement shortcut is a middleware inside the request-log and metrics middlewares. The read
shortcut comes before every middleware (``OrderLedgerAPI`` asks it first): for a read that
costs a fraction of a millisecond, the layers cost more than the read. It writes the same log
line and metrics with the same functions. Both are logged and counted as their routes.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.http.dependencies import is_json_media_type, scoped_key, valid_idempotency_key
from api.http.routes import access
from api.http.routes import order_queries as orders
from api.http.routes import orders as commands
from api.http.schemas.commands import OrderCreate
from api.key_store import ApiKeyStore, Principal
from api.logs import log_request, request_id, request_log
from api.metrics import count_request
from domain.money import MAX_AMOUNT
from projections.engine.point_read import PointReader

PREFIX = "/orders/"
_CANONICAL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MIN_POSITION_QUERY = re.compile(rb"min_position=([0-9]{1,19})")
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +(\S+)")


@dataclass(frozen=True)
class RouteLabel:
    """What the request log and the metrics read of a matched route: its path template."""

    path: str


ORDER_ROUTE = RouteLabel(PREFIX + "{order_id}")
ORDERS_ROUTE = RouteLabel(commands.router.prefix)
_READ_HEADERS = frozenset(
    {b"authorization", b"if-none-match", b"orderledger-min-position", b"x-request-id"}
)
_PLACEMENT_HEADERS = frozenset({b"authorization", b"content-type", b"idempotency-key"})
_READ_ROLE = next(a for router, a in access if router is orders.router).role_for("GET")
_PLACE_ROLE = next(a for router, a in access if router is commands.router).role_for("POST")


class OrderReadShortcut:
    """Answers the plain successful GET /orders/{id} before the app's middleware stack.

    ``OrderLedgerAPI`` asks it first, so such a read skips every ASGI layer (error, body-limit,
    log and metrics middlewares, routing): it writes the request's log line and metrics
    itself, with the same functions, and sends the response in two messages. A request it does
    not answer reaches the app untouched, nothing sent.
    """

    @staticmethod
    def takes(scope: Scope) -> bool:
        """Whether the request could be one it answers (a GET under /orders/)."""
        return bool(
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"].startswith(PREFIX)
        )

    async def answered(self, state: State, scope: Scope, send: Send) -> bool:
        started = time.perf_counter()
        request = _plain_read(scope, state.keys)
        if request is None:
            return False
        reader: PointReader | None = getattr(state, "order_reader", None)
        try:
            found = None if reader is None else await reader.aget(request.order_id)
            if found is None or found.row is None or found.position < request.floor:
                return False
            etag = orders.etag_of(found.row["version"])
            not_modified = orders.etag_matches(request.if_none_match, etag)
            body = b"" if not_modified else orders.public_json(found.row)
        except Exception:
            request_log.warning("the order read shortcut failed; the route answers", exc_info=True)
            return False
        rid = request_id(request.request_id)
        if not_modified:
            status, headers = 304, [(b"etag", etag.encode())]
        else:
            status = 200
            headers = [
                (b"content-length", str(len(body)).encode()),
                (b"content-type", b"application/json"),
                (b"etag", etag.encode()),
            ]
        headers.append((b"x-request-id", rid.encode()))
        scope["route"] = ORDER_ROUTE
        scope.setdefault("state", {})["principal"] = request.principal
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            seconds = time.perf_counter() - started
            count_request(scope, status, seconds)
            log_request(scope, rid, status, seconds * 1000)
        return True


@dataclass(frozen=True)
class _PlainRead:
    order_id: str
    principal: Principal
    if_none_match: str | None
    floor: int
    """The position the read model must have reached: min_position, query or header."""
    request_id: str | None
    """X-Request-ID as sent."""


def _plain_read(scope: Scope, keys: ApiKeyStore) -> _PlainRead | None:
    """What a request the shortcut may answer asks for, or None."""
    order_id = scope["path"][len(PREFIX) :]
    if not _CANONICAL_ID.fullmatch(order_id):
        return None
    query_floor = _query_floor(scope["query_string"])
    if query_floor is None:
        return None
    headers = _first(scope, _READ_HEADERS)
    principal = _principal(headers.get(b"authorization"), keys)
    if principal is None or (_READ_ROLE is not None and not principal.role.includes(_READ_ROLE)):
        return None
    header_floor = 0
    if b"orderledger-min-position" in headers:
        text = headers[b"orderledger-min-position"].strip()
        if not (text.isdigit() and int(text) <= MAX_AMOUNT):
            return None  # for the route to refuse
        header_floor = int(text)
    if_none_match = headers.get(b"if-none-match")
    sent_id = headers.get(b"x-request-id")
    return _PlainRead(
        order_id,
        principal,
        None if if_none_match is None else if_none_match.decode("latin-1"),
        max(query_floor, header_floor),
        None if sent_id is None else sent_id.decode("latin-1"),
    )


def _query_floor(query: bytes) -> int | None:
    """The position a query string asks for (0 for none), or None for any other query."""
    if not query:
        return 0
    match = _MIN_POSITION_QUERY.fullmatch(query)
    if match is None:
        return None
    value = int(match[1])
    return value if value <= MAX_AMOUNT else None


def _first(scope: Scope, names: frozenset[bytes]) -> dict[bytes, bytes]:
    """The first value of each of these headers, as Starlette's ``Headers.get`` reads them."""
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in names and name not in found:
            found[name] = value
    return found


def _principal(authorization: bytes | None, keys: ApiKeyStore) -> Principal | None:
    """The principal of a bearer key this process accepted lately, else None."""
    match = None if authorization is None else _BEARER.fullmatch(authorization.decode("latin-1"))
    return None if match is None else keys.cached(match[1])


class PlaceOrderShortcut:
    """Place the plain valid POST /orders here; pass everything else to the app.

    Outside the body-size limit: a body over ``max_bytes`` is handed on, for the app to refuse.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        plain = _plain_placement(scope) if _is_placement(scope) else None
        if plain is not None:
            body, whole = await _read_body(receive, self.max_bytes)
            command = _order_create(body) if whole else None
            if command is not None:
                await self._place(scope, receive, send, plain, command)
                return
            receive = _replaying(body, receive)
        await self.app(scope, receive, send)

    async def _place(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        plain: tuple[Principal, str | None],
        command: OrderCreate,
    ) -> None:
        principal, key = plain
        scope["route"] = ORDERS_ROUTE
        scope.setdefault("state", {})["principal"] = principal
        ledger = scope["app"].state.ledger
        scoped = None if key is None else scoped_key(principal.key_id, key)
        try:
            result = await run_in_threadpool(
                ledger.place_order, **command.model_dump(), idempotency_key=scoped
            )
        except Exception as error:
            response = await _problem(scope, receive, error)
        else:
            response = Response(
                commands.accepted(result).model_dump_json().encode(),
                status_code=201,
                media_type="application/json",
                headers=commands.placement_headers(result),
            )
        await response(scope, receive, send)


def _is_placement(scope: Scope) -> bool:
    return (
        scope["type"] == "http"
        and scope["method"] == "POST"
        and scope["path"] == commands.router.prefix
        and not scope["query_string"]
    )


def _plain_placement(scope: Scope) -> tuple[Principal, str | None] | None:
    """(principal, Idempotency-Key) of a placement the shortcut may make, or None."""
    headers = _first(scope, _PLACEMENT_HEADERS)
    principal = _principal(headers.get(b"authorization"), scope["app"].state.keys)
    content_type = headers.get(b"content-type", b"").decode("latin-1")
    if principal is None or not is_json_media_type(content_type):
        return None
    key = None
    if b"idempotency-key" in headers:
        key = headers[b"idempotency-key"].decode("latin-1")
        if not valid_idempotency_key(key):
            return None
    if _PLACE_ROLE is not None and not principal.role.includes(_PLACE_ROLE):
        return None
    return principal, key


async def _read_body(receive: Receive, limit: int) -> tuple[list[Message], bool]:
    """The request's body messages, and whether they are the whole body within ``limit``."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, False  # the client went away
        size += len(message.get("body", b""))
        if size > limit:
            return messages, False
        if not message.get("more_body", False):
            return messages, True


def _order_create(messages: list[Message]) -> OrderCreate | None:
    """The command, validated as the route validates it (JSON, then the model), or None."""
    body = b"".join(message.get("body", b"") for message in messages)
    try:
        return OrderCreate.model_validate(json.loads(body))
    except (ValueError, RecursionError, ValidationError):
        return None  # the route answers it (a 422 problem), from the same body


def _replaying(messages: list[Message], receive: Receive) -> Receive:
    """A receive that hands the app the messages already read, then the rest as it comes."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _problem(scope: Scope, receive: Receive, error: Exception) -> Response:
    """The app's own answer to an exception its handlers know; anything else propagates, as
    from the route."""
    handlers = scope["app"].exception_handlers
    for kind in type(error).__mro__:
        handler = handlers.get(kind)
        if handler is not None and kind is not Exception:
            return await handler(Request(scope, receive), error)  # type: ignore[no-any-return]
    raise error
