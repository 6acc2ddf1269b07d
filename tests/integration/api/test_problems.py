"""Every error the app can meet answers as RFC 9457 problem JSON, and no input produces a 500."""

from __future__ import annotations

import gc
import itertools
import json
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from api.http.app import MAX_BODY_BYTES, create_app
from api.settings import Settings
from tests.support.auth import authenticated
from tests.support.http import assert_problem, head_position, order_body
from tests.support.stores import open_ledger_at

JSON = "application/json"


def assert_no_server_error(response: httpx.Response) -> None:
    """Below 500, and any error is a problem document with the same status."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == response.status_code
        assert response.json()["detail"]


class TestRoutingProblems:
    """Paths and methods the app does not serve."""

    def test_an_unknown_path_is_a_not_found_problem(self, client: TestClient) -> None:
        """404 as problem JSON naming the path."""
        problem = assert_problem(client.get("/no/such/thing"), 404, "not-found")
        assert "/no/such/thing" in problem["detail"]

    def test_an_unsupported_method_is_a_method_not_allowed_problem(
        self, client: TestClient
    ) -> None:
        """405 as problem JSON, with the Allow header kept."""
        response = client.put("/orders")
        problem = assert_problem(response, 405, "method-not-allowed")
        assert "PUT" in problem["detail"]
        assert response.headers["Allow"] == "GET, POST"


class TestBodySizeLimit:
    """Request bodies are capped, whether their length is declared or streamed."""

    def test_a_body_declared_larger_than_the_cap_is_refused(self, client: TestClient) -> None:
        """Content-Length above the cap: 413 and nothing recorded."""
        body = json.dumps(order_body(shipping_address="x" * MAX_BODY_BYTES))
        response = client.post("/orders", content=body, headers={"content-type": JSON})
        problem = assert_problem(response, 413)
        assert str(MAX_BODY_BYTES) in problem["detail"]
        assert head_position(client) == 0

    def test_a_streamed_body_larger_than_the_cap_is_refused(self, client: TestClient) -> None:
        """A chunked body with no Content-Length is cut off once it passes the cap."""

        def chunks() -> Iterator[bytes]:
            yield b'{"customer_id": "'
            for _ in range(MAX_BODY_BYTES // 1024 + 1):
                yield b"c" * 1024
            yield b'"}'

        response = client.post("/orders", content=chunks(), headers={"content-type": JSON})
        assert "content-length" not in response.request.headers
        assert_problem(response, 413)

    def test_a_body_just_under_the_cap_is_accepted(self, client: TestClient) -> None:
        """The cap leaves room for any valid command (here padded with whitespace)."""
        body = json.dumps(order_body())
        padded = body + " " * (MAX_BODY_BYTES - len(body))
        response = client.post("/orders", content=padded, headers={"content-type": JSON})
        assert response.status_code == 201, response.text


class TestUnexpectedErrors:
    """A bug answers with a 500 problem that reveals nothing about it."""

    def test_an_unexpected_exception_is_a_bare_internal_error_problem(
        self, sqlite_url: str
    ) -> None:
        """No message, type or traceback of the failure reaches the client."""
        app = create_app(Settings(database_url=sqlite_url))

        def explode() -> None:
            raise RuntimeError("password=hunter2 at /srv/secret.py line 7")

        app.add_api_route("/explode", explode)
        with TestClient(app, raise_server_exceptions=False) as client:
            response = client.get("/explode", headers={"X-Request-ID": "bug-report-1"})
            generated = client.get("/explode")

        problem = assert_problem(response, 500, "internal-error")
        # The id to find the failure in the log by: the one sent, else a new one.
        assert response.headers["X-Request-ID"] == "bug-report-1"
        assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["X-Request-ID"])
        assert "hunter2" not in response.text
        assert "RuntimeError" not in response.text
        assert "Traceback" not in response.text
        assert set(problem) == {"type", "title", "status", "detail", "instance"}


class TestAppLifecycle:
    """create_app builds nothing until start-up; the lifespan owns what it opens."""

    def test_the_store_is_opened_at_start_up_not_when_the_app_is_built(
        self, tmp_path: Path
    ) -> None:
        """Building the app touches no database; starting it opens the configured one."""
        db = tmp_path / "ledger" / "orders.db"
        app = create_app(Settings(database_url=f"sqlite:///{db}"))
        assert not db.exists()
        with TestClient(app) as client:
            assert db.exists()
            authenticated(client, f"sqlite:///{db}")
            assert client.post("/orders", json=order_body()).status_code == 201
        with TestClient(create_app(Settings(database_url=f"sqlite:///{db}"))) as client:
            authenticated(client, f"sqlite:///{db}")
            assert head_position(client) == 1

    def test_a_ledger_passed_in_is_used_and_left_open(self, sqlite_url: str) -> None:
        """The caller that opened the ledger still owns it after the app stops."""
        ledger = open_ledger_at(sqlite_url)
        try:
            app = create_app(Settings(database_url="sqlite:////nonexistent/x.db"), ledger=ledger)
            with TestClient(app) as client:
                authenticated(client, "sqlite:////nonexistent/x.db")
                order_id = client.post("/orders", json=order_body()).json()["order_id"]
                assert app.state.ledger is ledger
            assert str(ledger.get_order(uuid.UUID(order_id)).id) == order_id
        finally:
            ledger.close()

    def test_what_start_up_built_is_left_out_of_full_collections_while_serving(
        self, sqlite_url: str
    ) -> None:
        """Frozen for the app's life (the collector skips it), handed back when it stops."""
        gc.unfreeze()
        with TestClient(create_app(Settings(database_url=sqlite_url))) as client:
            assert client.get("/healthz").status_code == 200
            frozen = gc.get_freeze_count()
            assert frozen > 10_000, frozen
        assert gc.get_freeze_count() == 0

    def test_health_says_ok_and_nothing_about_the_store(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """/healthz is open: it answers ok, never the head position (order volume)."""
        assert client.get("/healthz").json() == {"status": "ok"}
        place_order()
        assert client.get("/healthz").json() == {"status": "ok"}


class TestOpenAPI:
    """The schema documents problem responses, bounds and examples."""

    def test_the_schema_documents_problems_bounds_and_examples(self, client: TestClient) -> None:
        """Order routes declare problem+json errors; money is a bounded integer."""
        schema = client.get("/openapi.json").json()
        payments = schema["paths"]["/orders/{order_id}/payments"]["post"]
        for status in ("404", "409", "412", "422"):
            assert "application/problem+json" in payments["responses"][status]["content"]
        assert payments["summary"] == "Capture Payment"
        assert payments["description"] == "Capture part or all of the order's outstanding balance."
        components = schema["components"]["schemas"]
        amount = components["PaymentCreate"]["properties"]["amount"]
        assert (amount["type"], amount["minimum"]) == ("integer", 0)
        # FastAPI's OpenAPI model holds bounds as floats, so the exact limit is also in words.
        assert amount["maximum"] == float(10**15)
        assert "10**15" in amount["description"]
        assert components["PaymentCreate"]["additionalProperties"] is False
        assert components["OrderCreate"]["examples"][0]["currency"] == "EUR"
        assert "Problem" in components


# Bodies no client should send; (raw bytes, content type or None for no header).
ODD_BODIES: list[tuple[bytes, str | None]] = [
    (b"", JSON),
    (b"null", JSON),
    (b"[]", JSON),
    (b"[{}]", JSON),
    (b'"text"', JSON),
    (b"123", JSON),
    (b"true", JSON),
    (b"{}", JSON),
    (b'{"amount": 1e400, "payment_reference": "p"}', JSON),
    (b'{"amount": NaN, "payment_reference": "p"}', JSON),
    (b'{"amount": -Infinity, "payment_reference": "p"}', JSON),
    (b'{"amount": ' + b"9" * 5000 + b', "payment_reference": "p"}', JSON),
    (b'{"amount": 99999999999999999999999999, "payment_reference": "p"}', JSON),
    (b'{"amount": -9223372036854775809, "reason": "r"}', JSON),
    (b'{"amount": 9223372036854775807, "reason": "r", "payment_reference": "p"}', JSON),
    (b'{"quantity": -5, "unit_price": -1, "sku": "A"}', JSON),
    (b"[" * 5000 + b"]" * 5000, JSON),
    (b'{"reason": ' * 2000 + b"1" + b"}" * 2000, JSON),
    (b"\xff\xfe\xfa", JSON),
    ('{"reason": "fin"}'.encode("utf-16"), JSON),
    ('{"reason": "\u202e\u200b \U0001f4a5 \u00fc\u0301"}'.encode(), JSON),
    (b'{"reason": "\\u0000", "carrier": "\\u0000", "tracking_number": "\\u0000"}', JSON),
    (b'{"reason": "\\udfff"}', JSON),
    (b'{"reason": "a", "reason": 1}', JSON),
    (b'{"sku": "", "quantity": 1, "unit_price": 1}', JSON),
    (b'{"customer_id": {"$ne": 1}, "currency": ["EUR"], "lines": "all"}', JSON),
    (b"amount=1&payment_reference=p", "application/x-www-form-urlencoded"),
    (b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--", "multipart/form-data"),
    (b"<order/>", "application/xml"),
    (b'{"amount": 1, "payment_reference": "p"}', "text/plain"),
    (b'{"amount": 1, "payment_reference": "p"}', None),
    (b'{"amount": 1, "payment_reference": "p"}', "application/json; charset=latin-1"),
    (b'{"amount": 1, "payment_reference": "p"}', "application/merge-patch+json"),
]
COMMAND_PATHS = ["/payments", "/shipment", "/delivery", "/cancellation", "/refunds", "/lines"]


class TestOddInputs:
    """Whatever arrives, the answer is a success or a problem, never a server error."""

    def test_odd_bodies_never_cause_a_server_error(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """Each odd body on each command endpoint answers below 500."""
        order_id = place_order()
        paths = ["/orders"] + [f"/orders/{order_id}{suffix}" for suffix in COMMAND_PATHS]
        for path, (body, content_type) in itertools.product(paths, ODD_BODIES):
            headers = {"content-type": content_type} if content_type else {}
            assert_no_server_error(client.post(path, content=body, headers=headers))

    @pytest.mark.parametrize(
        "segment",
        ["%00", "..", "a" * 1000, "%F0%9F%98%80", "00000000-0000-0000-0000-000000000000", "%20"],
    )
    def test_odd_order_ids_never_cause_a_server_error(
        self, client: TestClient, segment: str
    ) -> None:
        """Odd path ids answer 404 or 422 on every order route."""
        for method, suffix in [("GET", "/history"), ("GET", "/state")] + [
            ("POST", path) for path in COMMAND_PATHS
        ]:
            response = client.request(method, f"/orders/{segment}{suffix}", json={})
            assert_no_server_error(response)
            assert response.status_code in (404, 422)

    def test_odd_skus_in_the_path_never_cause_a_server_error(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """Removing odd SKUs is refused as a problem, never a crash."""
        order_id = place_order()
        for sku in ["%00", "%20", "%C3%A9", "%FF", "a%2Fb", "\u00e9" * 64, "%09"]:
            response = client.delete(f"/orders/{order_id}/lines/{sku}")
            assert_no_server_error(response)
            # An encoded slash splits the path, which then matches no route.
            assert response.status_code in (404, 409, 422)

    def test_odd_headers_never_cause_a_server_error(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """Odd If-Match and Idempotency-Key values answer below 500."""
        order_id = place_order()
        odd: list[dict[str, str | bytes]] = [
            {"If-Match": ""},
            {"If-Match": "   "},
            {"If-Match": '"'},
            {"If-Match": '"99999999999999999999"'},
            {"If-Match": "\u00e9".encode("latin-1")},
            {"Idempotency-Key": " "},
            {"Idempotency-Key": "\u00fc\u00ff".encode("latin-1")},
            {"Idempotency-Key": "k" * 255},
            {"Idempotency-Key": "k" * 10_000},
        ]
        for headers in odd:
            body = {"amount": 1, "payment_reference": f"p{len(str(headers))}"}
            response = client.post(f"/orders/{order_id}/payments", json=body, headers=headers)
            assert_no_server_error(response)

    def test_odd_points_in_time_never_cause_a_server_error(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """Odd version and at values answer below 500."""
        order_id = place_order()
        for params in [
            {"version": ""},
            {"version": "NaN"},
            {"version": "1e3"},
            {"version": "99999999999999999999999"},
            {"at": ""},
            {"at": "2020-01-01T00:00:00+99:00"},
            {"at": "9999-12-31T23:59:59Z"},
            {"at": "0001-01-01T00:00:00Z"},
            {"at": "1700000000"},
            {"at": "2020-01-01T00:00:00 00:00"},
        ]:
            assert_no_server_error(client.get(f"/orders/{order_id}/state", params=params))

    def test_unicode_text_round_trips(self, client: TestClient) -> None:
        """Text beyond ASCII is stored and read back exactly."""
        customer = "Zo\u00eb \U0001f9fe \u05e2\u05d1\u05e8\u05d9\u05ea"
        address = "Stra\u00dfe 1\n10115 Berlin"
        response = client.post(
            "/orders", json=order_body(customer_id=customer, shipping_address=address)
        )
        assert response.status_code == 201, response.text
        state = client.get(f"/orders/{response.json()['order_id']}/state").json()
        assert (state["customer_id"], state["shipping_address"]) == (customer, address)
