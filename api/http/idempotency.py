"""Idempotency-Key for the POST and DELETE routes that are not order commands.

Order commands keep their key in the event store, saved atomically with the command's event
(domain/ledger.py). Every other write (webhook subscriptions, effect retries, projection
rebuilds, ...) keeps its first response here, in the ``http_idempotency`` table of the
read-model database, so a retry with the same key gets that response back instead of doing
the work again.

The protocol is claim, act, complete: a request first claims (scope, key) with a row that has
no status yet; the route then runs; a 2xx response is stored on the row, anything else
releases the claim (nothing was done, so a retry may try again). A duplicate that arrives
while the first is still running waits for it (up to ``WAIT_FOR_FIRST_SECONDS``) and replays
its response; a claim whose request died mid-way is taken over after ``ABANDONED_AFTER``.
Rows expire ``DEFAULT_TTL_SECONDS`` (24 hours) after they were claimed: a key may then be
used again. Keys are scoped by the caller's API key: one key's response is never replayed
to another key.

The response is stored in its own transaction after the route's work committed (that work
lives in other modules' transactions), so a process killed between the two leaves a bare
claim: a retry after ``ABANDONED_AFTER`` does the work again. Retrying an effect or starting a
rebuild twice is harmless (the second finds the work under way); a webhook subscription could
be made twice in that window, and shows up as a duplicate in GET /webhooks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from fastapi import Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement
from starlette.concurrency import run_in_threadpool

from api.http.dependencies import IdempotencyKeyHeader, idempotency_scope
from api.http.problems import problem_responses, response_headers
from projections.engine.database import install_schema, write_transaction

DEFAULT_TTL_SECONDS = 24 * 3600
ABANDONED_AFTER = 60.0
WAIT_FOR_FIRST_SECONDS = 10.0
_POLL_SECONDS = 0.02
REPLAYED_HEADER = "Idempotent-Replayed"
REPLAY_HEADER_DOC = response_headers(REPLAYED_HEADER)
# The response headers worth replaying; others (dates, request ids) belong to each answer.
_KEPT_HEADERS = ("content-type", "location", "etag", "orderledger-position")
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

metadata = MetaData()
http_idempotency = Table(
    "http_idempotency",
    metadata,
    Column("scope", String(64), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("body", LargeBinary, nullable=True),
    Column("headers", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Index("ix_http_idempotency_created_at", "created_at"),
)


@dataclass(frozen=True)
class StoredResponse:
    """The first response to a keyed request."""

    status_code: int
    body: bytes
    headers: dict[str, str]

    def replay(self) -> Response:
        headers = {**self.headers, REPLAYED_HEADER: "true"}
        return Response(content=self.body, status_code=self.status_code, headers=headers)


@dataclass(frozen=True)
class Claim:
    """A keyed request that is running: its response will complete the row."""

    scope: str
    key: str
    fingerprint: str


class KeyReusedError(Exception):
    """The key was first used for a different request."""


class StillRunningError(Exception):
    """The first request with the key has not finished yet."""


class ReplayError(Exception):
    """Raised from the claiming dependency to answer with the stored response instead."""

    def __init__(self, stored: StoredResponse) -> None:
        super().__init__("replaying a stored response")
        self.stored = stored


class HttpIdempotencyStore:
    """The http_idempotency table: claims and stored first responses."""

    def __init__(self, engine: Engine, *, ttl: float = DEFAULT_TTL_SECONDS) -> None:
        self.engine = engine
        self.ttl = ttl
        self._install()

    def _install(self) -> None:
        """Create the table (idempotent; safe when several processes start at once)."""
        install_schema(self.engine, partial(metadata.create_all, checkfirst=True))

    def claim(self, claim: Claim, now: float) -> StoredResponse | None:
        """Claim the key (None), or return the first response, or raise why not."""
        try:
            with self._writing() as conn:
                return self._claim(conn, claim, now)
        except IntegrityError:
            # Another request inserted the same claim first.
            raise StillRunningError from None

    def _claim(self, conn: Connection, claim: Claim, now: float) -> StoredResponse | None:
        conn.execute(delete(http_idempotency).where(http_idempotency.c.created_at < now - self.ttl))
        row = conn.execute(select(http_idempotency).where(*_row_of(claim))).first()
        if row is None:
            conn.execute(
                insert(http_idempotency).values(
                    scope=claim.scope, key=claim.key, fingerprint=claim.fingerprint, created_at=now
                )
            )
            return None
        if row.fingerprint != claim.fingerprint:
            raise KeyReusedError
        if row.status_code is not None:
            return StoredResponse(row.status_code, row.body, json.loads(row.headers))
        if row.created_at >= now - ABANDONED_AFTER:
            raise StillRunningError
        # The first request died mid-way: this one takes its claim over.
        conn.execute(update(http_idempotency).where(*_row_of(claim)).values(created_at=now))
        return None

    def complete(self, claim: Claim, response: StoredResponse) -> None:
        """Store the first response on the claim."""
        with self._writing() as conn:
            conn.execute(
                update(http_idempotency)
                .where(*_row_of(claim))
                .values(
                    status_code=response.status_code,
                    body=response.body,
                    headers=json.dumps(response.headers),
                )
            )

    def release(self, claim: Claim) -> None:
        """Drop a claim whose request did nothing, so a retry may run it again."""
        with self._writing() as conn:
            conn.execute(
                delete(http_idempotency).where(
                    *_row_of(claim), http_idempotency.c.status_code.is_(None)
                )
            )

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        with write_transaction(self.engine) as conn:
            yield conn


def _row_of(claim: Claim) -> tuple[ColumnElement[bool], ...]:
    return (http_idempotency.c.scope == claim.scope, http_idempotency.c.key == claim.key)


_STORE_LOCK = threading.Lock()


def get_store(request: Request) -> HttpIdempotencyStore:
    """The app's store on the read-model database, its table created on first use."""
    with _STORE_LOCK:
        store = getattr(request.app.state, "http_idempotency", None)
        if store is None:
            store = HttpIdempotencyStore(request.app.state.projections.engine)
            request.app.state.http_idempotency = store
    return cast(HttpIdempotencyStore, store)


def request_fingerprint(method: str, path: str, query: str, body: bytes) -> str:
    """Method, path, sorted query and body; a JSON body is compared by value, not by bytes."""
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        canonical = body
    query_part = "&".join(sorted(query.split("&"))) if query else ""
    head = f"{method} {path}?{query_part}\n".encode()
    return hashlib.sha256(head + canonical).hexdigest()


async def claim_idempotency_key(request: Request, key: IdempotencyKeyHeader) -> None:
    """Claim the request's Idempotency-Key, or answer with the first response to it."""
    if key is None:
        return
    body = await request.body()
    fingerprint = request_fingerprint(request.method, request.url.path, request.url.query, body)
    claim = Claim(scope=idempotency_scope(request), key=key, fingerprint=fingerprint)
    store = await run_in_threadpool(get_store, request)
    deadline = time.monotonic() + WAIT_FOR_FIRST_SECONDS
    while True:
        try:
            stored = await run_in_threadpool(store.claim, claim, time.time())
        except KeyReusedError:
            raise _key_reused(key) from None
        except StillRunningError:
            if time.monotonic() < deadline:
                await asyncio.sleep(_POLL_SECONDS)
                continue
            raise HTTPException(
                409,
                detail="the first request with this Idempotency-Key is still running; retry",
                headers={"Retry-After": "1"},
            ) from None
        if stored is not None:
            raise ReplayError(stored)
        request.state.idempotency_claim = claim
        return


def _key_reused(key: str) -> RequestValidationError:
    return RequestValidationError(
        [
            {
                "type": "value_error",
                "loc": ("header", "Idempotency-Key"),
                "msg": f"Idempotency-Key {key!r} was already used for a different request",
                "input": key,
            }
        ]
    )


class IdempotentRoute(APIRoute):
    """A route whose writes honour Idempotency-Key through the http_idempotency table."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        methods = {method.upper() for method in kwargs.get("methods") or ()}
        if methods & _WRITE_METHODS:
            kwargs["dependencies"] = [
                *(kwargs.get("dependencies") or []),
                Depends(claim_idempotency_key),
            ]
            kwargs["responses"] = _with_replay_documented(
                dict(kwargs.get("responses") or {}), kwargs.get("status_code") or 200
            )
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_once(request: Request) -> Response:
            try:
                response = await handle(request)
            except ReplayError as replay:
                return replay.stored.replay()
            except BaseException:
                await _release(request)
                raise
            claim: Claim | None = getattr(request.state, "idempotency_claim", None)
            if claim is None:
                return response
            if 200 <= response.status_code < 300:
                # A route may store another answer than the one it gives (see replay_instead).
                stored = getattr(request.state, "idempotency_replay", None) or StoredResponse(
                    response.status_code,
                    bytes(response.body),
                    {
                        name: value
                        for name, value in response.headers.items()
                        if name in _KEPT_HEADERS
                    },
                )
                await run_in_threadpool(get_store(request).complete, claim, stored)
            else:
                await _release(request)
            return response

        return handle_once


def replay_instead(request: Request, response: Response) -> None:
    """Have a retry with this request's Idempotency-Key get ``response``, not the first answer.

    For answers that must not be stored, such as a new API key's token, which exists in one
    response only: a retry gets a problem saying what was done instead of a second key.
    """
    request.state.idempotency_replay = StoredResponse(
        response.status_code,
        bytes(response.body),
        {name: value for name, value in response.headers.items() if name in _KEPT_HEADERS},
    )


def _with_replay_documented(
    responses: dict[int | str, dict[str, Any]], status: int
) -> dict[int | str, dict[str, Any]]:
    """Responses plus the replay header on success, and the problems a key can cause."""
    success = dict(responses.get(status, {}))
    success["headers"] = {**success.get("headers", {}), **REPLAY_HEADER_DOC["headers"]}
    return {**problem_responses(409, 422), **responses, status: success}


async def _release(request: Request) -> None:
    claim: Claim | None = getattr(request.state, "idempotency_claim", None)
    if claim is not None:
        await run_in_threadpool(get_store(request).release, claim)
