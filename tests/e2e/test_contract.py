"""The API's promises about retries, conditions and bad input, checked over real TCP."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.support.http import assert_problem, head_position, order_body
from tests.support.processes import Server
from tests.support.shop import Shop


def history_types(http: httpx.Client, order_id: str) -> list[str]:
    """The types of the order's events, oldest first."""
    response = http.get(f"/orders/{order_id}/history")
    assert response.status_code == 200, response.text
    return [event["type"] for event in response.json()["events"]]


class TestRetriesOverTheWire:
    """Idempotency-Key replays and If-Match conditions."""

    def test_retries_replay_the_first_response_and_stale_conditions_are_412(
        self, server: Server
    ) -> None:
        """Same key and body: the original answer and no new event, one order even from twenty
        clients at once; another body: 422; a stale If-Match: 412 with the current version,
        nothing recorded."""
        with server.client() as http:
            # A placement sent twice, then its key reused for another order.
            key = {"Idempotency-Key": f"cart-{uuid.uuid4().hex}"}
            first = http.post("/orders", json=order_body(), headers=key)
            assert first.status_code == 201, first.text
            head = head_position(http)
            again = http.post("/orders", json=order_body(), headers=key)
            assert (again.status_code, again.json()) == (201, first.json())
            assert again.headers["Idempotent-Replayed"] == "true"
            assert again.headers["Location"] == first.headers["Location"]
            assert head_position(http) == head
            assert_problem(http.post("/orders", json=order_body(currency="USD"), headers=key), 422)
            assert head_position(http) == head

            # A payment sent twice is captured once.
            order_id = first.json()["order_id"]
            payment = {"amount": 1000, "payment_reference": "psp-retry"}
            paid = http.post(
                f"/orders/{order_id}/payments", json=payment, headers={"Idempotency-Key": "pay-1"}
            )
            repaid = http.post(
                f"/orders/{order_id}/payments", json=payment, headers={"Idempotency-Key": "pay-1"}
            )
            assert paid.status_code == repaid.status_code == 200
            assert repaid.json() == paid.json()
            assert history_types(http, order_id) == ["OrderPlaced", "PaymentCaptured"]

            # Twenty clients send one placement with one key at the same moment: one order.
            burst_key = {"Idempotency-Key": f"burst-{uuid.uuid4().hex}"}
            body = order_body(customer_id="cust-burst")

            def place(_: int) -> httpx.Response:
                return http.post("/orders", json=body, headers=burst_key)

            with ThreadPoolExecutor(max_workers=20) as pool:
                answers = list(pool.map(place, range(20)))
            assert {answer.status_code for answer in answers} == {201}, answers[0].text
            assert len({answer.text for answer in answers}) == 1
            position = answers[0].json()["position"]
            listed = http.get(
                "/orders", params={"customer_id": "cust-burst", "min_position": position}
            )
            assert len(listed.json()["data"]) == 1

            # A command conditioned on an old version.
            line = {"sku": "SKU-9", "quantity": 1, "unit_price": 10}
            stale = http.post(f"/orders/{order_id}/lines", json=line, headers={"If-Match": '"1"'})
            assert assert_problem(stale, 412)["current_version"] == 2
            assert history_types(http, order_id) == ["OrderPlaced", "PaymentCaptured"]
            current = http.post(
                f"/orders/{order_id}/payments",
                json={"amount": 10, "payment_reference": "psp-3"},
                headers={"If-Match": '"2"'},
            )
            assert current.headers["ETag"] == '"3"'
            assert history_types(http, order_id) == ["OrderPlaced"] + ["PaymentCaptured"] * 2


class TestBadInputOverTheWire:
    """Problem documents, never a server error."""

    def test_bad_requests_are_problems_and_never_server_errors(self, server: Server) -> None:
        """422 naming each field, 413 over the body cap, 404 for unknown orders, and a handful
        of hostile requests each answered below 500 with a problem document."""
        with server.client() as http:
            body = order_body(currency="EURO", surprise=1)
            body["lines"][0]["quantity"] = "two"
            problem = assert_problem(http.post("/orders", json=body), 422)
            fields = {error["field"] for error in problem["errors"]}
            assert {"body.currency", "body.surprise", "body.lines.0.quantity"} <= fields

            # Over the cap, whether declared by Content-Length or streamed in chunks.
            huge = order_body(shipping_address="x" * 100_000)
            assert_problem(http.post("/orders", json=huge), 413)
            chunks = (b"x" * 1024 for _ in range(100))
            streamed = http.post(
                "/orders", content=chunks, headers={"content-type": "application/json"}
            )
            assert_problem(streamed, 413)

            missing = uuid.uuid4()
            assert_problem(http.get(f"/orders/{missing}/history"), 404)
            assert_problem(http.get(f"/orders/{missing}"), 404)
            payment = {"amount": 1, "payment_reference": "p"}
            assert_problem(http.post(f"/orders/{missing}/payments", json=payment), 404)
            assert http.get("/no/such/route").status_code == 404

            order_id = Shop(http).place()
            hostile = [
                ("POST", "/orders", b"{not json"),
                ("POST", "/orders", b"[]"),
                ("POST", "/orders", b'{"customer_id": "\\ud800"}'),
                ("POST", f"/orders/{order_id}/payments", b'{"amount": 1e400}'),
                ("POST", f"/orders/{order_id}/payments", b'{"amount": 9223372036854775808}'),
                ("POST", "/orders/not-a-uuid/payments", b"{}"),
                ("GET", "/orders?limit=100000", b""),
                ("GET", "/orders?cursor=%00", b""),
                ("GET", f"/orders/{order_id}/state?version=-1", b""),
            ]
            for method, path, content in hostile:
                response = http.request(
                    method, path, content=content, headers={"content-type": "application/json"}
                )
                assert 400 <= response.status_code < 500, (method, path, response.text)
                assert response.headers["content-type"] == "application/problem+json"
