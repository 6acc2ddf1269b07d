"""The shortcuts for GET /orders/{id} and POST /orders answer exactly what the routes answer,
and only when they may."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from api.http import shortcuts
from api.http.app import create_app
from api.http.routes import order_queries as orders
from api.key_store import ApiKeyStore, Role
from api.settings import Settings
from projections.engine.point_read import PointRead, PointReader
from projections.engine.rebuild import rebuild
from projections.engine.runtime import ProjectionRuntime
from projections.order_summaries import summary_from
from tests.support.auth import bearer, issue_key
from tests.support.http import order_body
from tests.support.stores import open_ledger_at

LONG_WAIT = 60.0


class CountingReader:
    """Counts the point reads the shortcut makes: one for each request it takes up."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = shortcuts._plain_read

        def counted(scope: Any, keys: Any) -> Any:
            taken = original(scope, keys)
            self.calls += taken is not None
            return taken

        monkeypatch.setattr(shortcuts, "_plain_read", counted)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> CountingReader:
    return CountingReader(monkeypatch)


def patient_settings(store_url: str, **overrides: Any) -> Settings:
    """Settings that wait long for read-your-writes and keep a key cached for the whole test,
    however slow the machine: the shortcut answers only keys in the cache."""
    return Settings(
        database_url=store_url,
        read_your_writes_timeout=LONG_WAIT,
        key_cache_ttl=LONG_WAIT,
        **overrides,
    )


@pytest.fixture
def shop(store_url: str) -> Iterator[TestClient]:
    """The app with its embedded worker; sends a writer key (accepted once, then cached for the
    whole test, however slow the machine: the shortcut answers only keys in the cache)."""
    settings = patient_settings(store_url)
    headers = bearer(issue_key(store_url, Role.writer, "shop"))
    with TestClient(create_app(settings), headers=headers) as client:
        yield client


def place(
    client: TestClient, headers: dict[str, str] | None = None, **overrides: Any
) -> tuple[str, int]:
    response = client.post("/orders", json=order_body(**overrides), headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["order_id"]), int(response.json()["position"])


def command(client: TestClient, order_id: str, path: str, body: dict[str, Any]) -> int:
    response = client.post(f"/orders/{order_id}{path}", json=body)
    assert response.status_code == 200, response.text
    return int(response.json()["position"])


def orders_in_every_state(client: TestClient) -> tuple[list[str], int]:
    """Orders placed, partly paid, paid and shipped, delivered, cancelled and refunded."""
    ids = []
    position = 0
    for number in range(5):
        order_id, position = place(client, customer_id=f"hot-{number}")
        ids.append(order_id)
    position = command(client, ids[1], "/payments", {"amount": 100, "payment_reference": "p1"})
    for order_id in ids[2:4]:
        summary = client.get(f"/orders/{order_id}", params={"min_position": position})
        paid = {"amount": summary.json()["total"], "payment_reference": "p"}
        command(client, order_id, "/payments", paid)
        shipped = {"carrier": "DHL", "tracking_number": "JD1"}
        position = command(client, order_id, "/shipment", shipped)
    position = command(client, ids[3], "/delivery", {})
    command(client, ids[4], "/payments", {"amount": 500, "payment_reference": "p4"})
    position = command(client, ids[4], "/cancellation", {"reason": "changed mind"})
    return ids, position


def answer(response: httpx.Response) -> tuple[int, bytes, dict[str, str]]:
    """Status, body and headers, without the per-request id."""
    headers = {k.lower(): v for k, v in response.headers.items() if k.lower() != "x-request-id"}
    return response.status_code, response.content, headers


class TestSameAnswerAsTheRoute:
    """An upper-case id is left to the route, which reads the same order: both answers compare."""

    def test_every_state_gives_the_routes_status_body_and_headers(
        self, shop: TestClient, reads: CountingReader
    ) -> None:
        ids, position = orders_in_every_state(shop)
        at = {"min_position": position}
        assert shop.get(f"/orders/{ids[0]}", params=at).status_code == 200
        for order_id in ids:
            before = reads.calls
            shortcut = shop.get(f"/orders/{order_id}", params=at)
            assert reads.calls == before + 1  # answered by the shortcut
            routed = shop.get(f"/orders/{order_id.upper()}", params=at)
            assert reads.calls == before + 1  # left to the route
            assert answer(shortcut) == answer(routed)
            assert shortcut.status_code == 200
        statuses = {shop.get(f"/orders/{i}").json()["status"] for i in ids}
        assert statuses == {
            "pending_payment",
            "partially_paid",
            "shipped",
            "delivered",
            "cancelled",
        }

    def test_if_none_match_gives_the_routes_304(
        self, shop: TestClient, reads: CountingReader
    ) -> None:
        order_id, position = place(shop)
        first = shop.get(f"/orders/{order_id}", params={"min_position": position})
        etag = first.headers["ETag"]
        assert etag == '"1"'
        for if_none_match in (etag, f'"7", {etag}', "*"):
            headers = {"If-None-Match": if_none_match}
            before = reads.calls
            shortcut = shop.get(f"/orders/{order_id}", headers=headers)
            assert reads.calls == before + 1
            routed = shop.get(f"/orders/{order_id.upper()}", headers=headers)
            assert answer(shortcut) == answer(routed)
        assert shop.get(f"/orders/{order_id}", headers={"If-None-Match": etag}).status_code == 304
        assert shop.get(f"/orders/{order_id}", headers={"If-None-Match": '"2"'}).status_code == 200

    def test_the_min_position_header_is_honoured(
        self, shop: TestClient, reads: CountingReader
    ) -> None:
        order_id, position = place(shop)
        headers = {"Orderledger-Min-Position": str(position)}
        before = reads.calls
        response = shop.get(f"/orders/{order_id}", headers=headers)
        assert response.status_code == 200
        assert response.json()["last_position"] == position
        assert reads.calls == before + 1


class TestLeftToTheRoute:
    """What the shortcut must not answer gets the route's documented answer."""

    def test_unknown_order_no_key_bad_key_and_bad_queries(
        self, shop: TestClient, store_url: str, reads: CountingReader
    ) -> None:
        order_id, position = place(shop)
        assert shop.get(f"/orders/{order_id}", params={"min_position": position}).status_code == 200
        missing = shop.get("/orders/00000000-0000-4000-8000-000000000000")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        anonymous = shop.get(f"/orders/{order_id}", headers={"Authorization": ""})
        assert anonymous.status_code == 401
        wrong = shop.get(f"/orders/{order_id}", headers=bearer("olk_0123456789abcdef_" + "x" * 43))
        assert wrong.status_code == 401
        assert wrong.headers["WWW-Authenticate"].startswith("Bearer")
        for query in ("min_position=-1", "min_position=abc", "min_position=1&x=2"):
            assert shop.get(f"/orders/{order_id}?{query}").status_code in (200, 422)
        assert shop.get(f"/orders/{order_id}?min_position=-1").status_code == 422
        too_far = {"Orderledger-Min-Position": "99999999999999999999"}
        assert shop.get(f"/orders/{order_id}", headers=too_far).status_code == 422

    def test_a_position_not_reached_is_the_routes_503(self, store_url: str) -> None:
        token = issue_key(store_url, Role.reader, "idle reader")
        settings = Settings(
            database_url=store_url, run_projections=False, read_your_writes_timeout=0.2
        )
        ledger = open_ledger_at(store_url)
        try:
            with TestClient(create_app(settings), headers=bearer(token)) as idle:
                placed = ledger.place_order(**order_body())
                idle.app.state.projections.worker().run_until_caught_up(timeout=60)  # type: ignore[attr-defined]
                later = ledger.place_order(**order_body())
                path = f"/orders/{placed.order_id}"
                assert idle.get(path, params={"min_position": placed.position}).status_code == 200
                waiting = idle.get(path, params={"min_position": later.position})
                assert waiting.status_code == 503
                assert waiting.headers["Retry-After"] == "1"
        finally:
            ledger.close()

    def test_a_revoked_key_is_refused_once_the_cache_lets_go(
        self, store_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        keys = ApiKeyStore.from_url(store_url)
        issued = keys.create(Role.reader, "soon revoked")
        ttl = 0.5
        settings = Settings(
            database_url=store_url, read_your_writes_timeout=LONG_WAIT, key_cache_ttl=ttl
        )
        writer = bearer(issue_key(store_url, Role.writer))
        try:
            with TestClient(create_app(settings)) as client:
                order_id, position = place(client, headers=writer)
                headers = bearer(issued.token)
                at = {"min_position": position}
                path = f"/orders/{order_id}"
                assert client.get(path, params=at, headers=headers).status_code == 200
                keys.revoke(issued.key_id)
                revoked_at = time.monotonic()
                statuses = []
                while time.monotonic() < revoked_at + ttl + LONG_WAIT:
                    statuses.append(client.get(path, headers=headers).status_code)
                    if statuses[-1] == 401:
                        break
                    time.sleep(ttl / 10)
                # Answered until the cache let go (at most ttl, more on a slow machine), then
                # refused for good.
                assert statuses[-1] == 401
                assert statuses[:-1] == [200] * (len(statuses) - 1)
                assert client.get(path, headers=headers).status_code == 401
        finally:
            keys.close()


class TestObservedAsTheRoute:
    def test_logged_and_counted_under_the_route_template(
        self, shop: TestClient, reads: CountingReader, caplog: pytest.LogCaptureFixture
    ) -> None:
        order_id, position = place(shop)
        assert shop.get(f"/orders/{order_id}", params={"min_position": position}).status_code == 200
        labels = {"route": "/orders/{order_id}", "method": "GET", "status": "200"}
        counted = REGISTRY.get_sample_value("orderledger_http_requests_total", labels) or 0.0
        before = reads.calls
        with caplog.at_level(logging.INFO, logger="orderledger.http"):
            response = shop.get(f"/orders/{order_id}", headers={"X-Request-ID": "hot-read-1"})
        assert reads.calls == before + 1
        assert response.headers["X-Request-ID"] == "hot-read-1"
        assert REGISTRY.get_sample_value("orderledger_http_requests_total", labels) == counted + 1
        (line,) = [r for r in caplog.records if getattr(r, "request_id", None) == "hot-read-1"]
        assert line.route == "/orders/{order_id}"  # type: ignore[attr-defined]
        assert line.status == 200  # type: ignore[attr-defined]
        assert line.key_id  # type: ignore[attr-defined]

    def test_a_request_id_is_made_when_none_is_sent(
        self, shop: TestClient, reads: CountingReader
    ) -> None:
        order_id, position = place(shop)
        assert shop.get(f"/orders/{order_id}", params={"min_position": position}).status_code == 200
        before = reads.calls
        first, second = (shop.get(f"/orders/{order_id}") for _ in range(2))
        assert reads.calls == before + 2
        assert re.fullmatch(r"[0-9a-f]{32}", first.headers["X-Request-ID"])
        assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]
        insane = shop.get(f"/orders/{order_id}", headers={"X-Request-ID": "no spaces allowed"})
        assert re.fullmatch(r"[0-9a-f]{32}", insane.headers["X-Request-ID"])

    def test_a_failure_in_the_shortcut_leaves_the_read_to_the_route(
        self,
        shop: TestClient,
        reads: CountingReader,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        order_id, position = place(shop)
        at = {"min_position": position}
        expected = answer(shop.get(f"/orders/{order_id}", params=at))

        original = PointReader.aget
        failed: list[str] = []

        async def fails_once(reader: PointReader, key: str) -> Any:
            if not failed:
                failed.append(key)
                raise RuntimeError("cannot read this order")
            return await original(reader, key)

        monkeypatch.setattr(PointReader, "aget", fails_once)
        before = reads.calls
        with caplog.at_level(logging.WARNING, logger="orderledger.http"):
            routed = shop.get(f"/orders/{order_id}", params=at)
        assert reads.calls == before + 1  # the shortcut tried
        assert answer(routed) == expected  # and the route answered, as it would have
        assert any("shortcut failed" in record.getMessage() for record in caplog.records)

    def test_with_opentelemetry_on_every_read_takes_the_route(
        self, store_url: str, reads: CountingReader
    ) -> None:
        settings = patient_settings(store_url, opentelemetry=True)
        headers = bearer(issue_key(store_url, Role.writer, "traced"))
        with TestClient(create_app(settings), headers=headers) as traced:
            order_id, position = place(traced)
            for _ in range(3):
                found = traced.get(f"/orders/{order_id}", params={"min_position": position})
                assert found.status_code == 200
                assert found.json()["order_id"] == order_id
        assert reads.calls == 0


ReadWith = Callable[[PointReader], Callable[[str], PointRead | None]]


@pytest.fixture(params=["get", "aget"])
def read_with(request: pytest.FixtureRequest) -> Iterator[ReadWith]:
    """A reader's ``get``, or its ``aget`` on one event loop kept for the test (as a server's)."""
    if request.param == "get":
        yield lambda reader: reader.get
        return
    loop = asyncio.new_event_loop()
    try:
        yield lambda reader: lambda key: loop.run_until_complete(reader.aget(key))
    finally:
        loop.close()


class TestPointReader:
    """The reader under the shortcut follows the serving generation through rebuilds."""

    def test_reads_the_new_generation_after_a_rebuild(
        self, store_url: str, read_with: ReadWith
    ) -> None:
        ledger = open_ledger_at(store_url)
        runtime = ProjectionRuntime.open(ledger, store_url)
        point_reader = PointReader(
            runtime.engine, runtime.catalog, "order_summaries", "order_summaries"
        )
        reader = SimpleNamespace(get=read_with(point_reader), close=point_reader.close)
        try:
            assert reader.get("00000000-0000-4000-8000-000000000000") is None  # not built yet
            placed = ledger.place_order(**order_body(customer_id="before-rebuild"))
            runtime.worker().run_until_caught_up(timeout=60)
            first = reader.get(str(placed.order_id))
            assert first is not None and first.row is not None
            assert first.checkpoint.position >= placed.position
            assert first.row["customer_id"] == "before-rebuild"
            old = runtime.catalog.serving("order_summaries")
            assert old is not None
            new = rebuild(runtime, "order_summaries")
            assert new.generation != old.generation
            again = reader.get(str(placed.order_id))
            assert again is not None and again.row is not None
            assert {k: v for k, v in again.row.items()} == first.row
            missing = reader.get("00000000-0000-4000-8000-000000000000")
            assert missing is not None and missing.row is None
            assert missing.checkpoint == again.checkpoint
        finally:
            reader.close()
            runtime.close()
            ledger.close()

    def test_the_row_equals_the_ordinary_read(self, store_url: str, read_with: ReadWith) -> None:
        ledger = open_ledger_at(store_url)
        runtime = ProjectionRuntime.open(ledger, store_url)
        point_reader = PointReader(
            runtime.engine, runtime.catalog, "order_summaries", "order_summaries"
        )
        reader = SimpleNamespace(get=read_with(point_reader), close=point_reader.close)
        try:
            placed = ledger.place_order(**order_body())
            runtime.worker().run_until_caught_up(timeout=60)

            def ordinary(conn: Any, tables: Any) -> dict[str, Any]:
                table = tables["order_summaries"]
                row = conn.execute(table.select().where(table.c.order_id == str(placed.order_id)))
                return dict(row.one()._mapping)

            found = reader.get(str(placed.order_id))
            assert found is not None
            assert found.row == runtime.read("order_summaries", ordinary)
            assert json.loads(found.row["lines"])  # the lines column, as stored
        finally:
            reader.close()
            runtime.close()
            ledger.close()


class BatchRecordingReader(PointReader):
    """Records the size of each batch of reads it sends (PostgreSQL)."""

    batches: list[int]

    def _take(self) -> Any:
        batch = super()._take()
        self.__dict__.setdefault("batches", []).append(len(batch))
        return batch


@pytest.mark.postgres
def test_concurrent_reads_on_postgresql_are_batched_and_each_gets_its_own_answer(
    postgres_url: str,
) -> None:
    ledger = open_ledger_at(postgres_url)
    runtime = ProjectionRuntime.open(ledger, postgres_url)
    reader = BatchRecordingReader(
        runtime.engine, runtime.catalog, "order_summaries", "order_summaries"
    )
    try:
        placed = {
            str(ledger.place_order(**order_body(customer_id=f"c-{n}")).order_id): f"c-{n}"
            for n in range(40)
        }
        runtime.worker().run_until_caught_up(timeout=60)
        missing = [str(uuid.uuid4()) for _ in range(20)]
        keys = [*placed, *missing, *list(placed)[:10]]  # some asked for twice at once

        async def all_at_once() -> list[PointRead | None]:
            return await asyncio.gather(*(reader.aget(key) for key in keys))

        answers = asyncio.run(all_at_once())
        for key, found in zip(keys, answers, strict=True):
            assert found is not None
            if key in placed:
                assert found.row is not None and found.row["order_id"] == key
                assert found.row["customer_id"] == placed[key]
            else:
                assert found.row is None
            assert found.checkpoint == answers[0].checkpoint  # type: ignore[union-attr]
        assert sum(reader.batches) == len(set(keys))  # every key asked for once
        assert len(reader.batches) < len(keys) and max(reader.batches) > 1
    finally:
        reader.close()
        runtime.close()
        ledger.close()


_text = st.text(max_size=40)
_amount = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_moment = st.datetimes(
    timezones=st.none()
    | st.just(UTC)
    | st.timezones()
    | st.builds(
        timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23))
    )
)
_line = st.tuples(st.integers(1, 10**6), _amount)
_row = st.fixed_dictionaries(
    {
        "order_id": st.uuids().map(str),
        "status": st.sampled_from(
            ["pending_payment", "partially_paid", "paid", "shipped", "delivered", "cancelled"]
        ),
        "customer_id": _text,
        "currency": st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=3, max_size=3),
        "line_count": st.integers(0, 1000),
        "lines": st.dictionaries(_text, _line, max_size=5).map(json.dumps),
        "total": _amount,
        "captured": _amount,
        "refunded": _amount,
        "refund_due": _amount,
        "balance_due": _amount,
        "shipped": st.booleans(),
        "delivered": st.booleans(),
        "cancelled": st.booleans(),
        "placed_at": _moment,
        "updated_at": _moment,
        "version": st.integers(1, 2**31),
        "last_position": st.integers(1, 2**63 - 1),
    }
)


class TestOrderJson:
    """The shortcut writes an order's JSON from the row; the route through its model."""

    @given(_row)
    def test_the_same_bytes_as_the_routes_model(self, row: dict[str, Any]) -> None:
        assert (
            orders.public_json(row) == orders.public(summary_from(row)).model_dump_json().encode()
        )


ODD_MEDIA_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "APPLICATION/JSON",
    "application/json;",
    "application/vnd.api+json",
    "application/problem+json",
    "text/plain+json",
    "+json",
    "application/jsonx",
    "text/json",
    "json",
    "",
]

ROUTED = "/orders?via=route"
"""A query the route ignores and the shortcut does not take: the same request, by the route."""
