"""The read an order service answers most, served without FastAPI's per-request work.

Reading one order (``GET /orders/{id}``) dominates an order service's traffic. The route itself
reads with one point read on the event loop and writes the body from the row, yet FastAPI's
routing and dependency resolution still cost several times the read (about 0.2 ms of CPU per
request against 0.03 ms here). This shortcut answers the plain, valid case with the status,
body and headers the route gives, using the route's own functions for each rule: the same
point reader, ``etag_of``/``etag_matches``/``public_json`` of the route, the same reading of
the bearer key (``bearer_token``) and the role from the same access table, the request log and
metrics functions (``tests/integration/api/test_shortcuts.py`` compares the answers):

- a key this process accepted within its cache time, with the route's role;
- an order id in canonical form, no other query than ``min_position`` (already passed, as far
  as the read model's checkpoint tells without a look-up: ``passed_by_position``), an order
  that exists.

Everything else (no key, a key not seen lately, too low a role, an unknown order, any other
``min_position``, any other query or header) goes on to the route, untouched.
The route stays the one place that decides errors and documents the operation in OpenAPI.

It comes before every middleware (``OrderLedgerAPI`` asks it first): for a read that costs a
fraction of a millisecond, the layers cost more than the read. It is logged and counted as
the route.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from starlette.datastructures import State
from starlette.types import Scope, Send

from api.http.auth import bearer_token
from api.http.routes import access
from api.http.routes import order_queries as orders
from api.key_store import ApiKeyStore, Principal
from api.logs import finish_request, request_id, request_log
from domain.eventstore import passed_by_position
from domain.money import MAX_AMOUNT
from projections.engine.point_read import PointReader

PREFIX = "/orders/"
_CANONICAL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MIN_POSITION_QUERY = re.compile(rb"min_position=([0-9]{1,19})")


@dataclass(frozen=True)
class RouteLabel:
    """What the request log and the metrics read of a matched route: its path template."""

    path: str


ORDER_ROUTE = RouteLabel(PREFIX + "{order_id}")
_READ_HEADERS = frozenset(
    {b"authorization", b"if-none-match", b"orderledger-min-position", b"x-request-id"}
)
_READ_ROLE = next(a for router, a in access if router is orders.router).role_for("GET")


class OrderReadShortcut:
    """Answers the plain successful GET /orders/{id} before the app's middleware stack.

    ``OrderLedgerAPI`` asks it first, so such a read skips every ASGI layer (error, body-limit
    and request-log middlewares, routing): it records the request's log line and metrics
    itself, with the same function, and sends the response in two messages. A request it does
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
            if found is None or found.row is None:
                return False
            if request.floor and not passed_by_position(found.checkpoint, request.floor):
                return False  # the route looks up the checkpoint of the floor's event
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
            finish_request(scope, rid, status, time.perf_counter() - started)
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
    token = None if authorization is None else bearer_token(authorization.decode("latin-1"))
    return None if token is None else keys.cached(token)
