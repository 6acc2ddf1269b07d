"""The order endpoints over HTTP: commands, rejections, conditions, idempotency and audit reads."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.http import assert_problem, head_position, history_length, order_body

Step = tuple[str, str, dict[str, Any] | None]

PAY_ALL: Step = ("POST", "/payments", {"amount": 3000, "payment_reference": "pay-all"})
PAY_SOME: Step = ("POST", "/payments", {"amount": 1000, "payment_reference": "pay-some"})
SHIP: Step = ("POST", "/shipment", {"carrier": "DHL", "tracking_number": "JD0146000"})
DELIVER: Step = ("POST", "/delivery", None)
CANCEL: Step = ("POST", "/cancellation", {"reason": "customer changed mind"})


def send(client: TestClient, order_id: str, step: Step, **kwargs: Any) -> Any:
    """Send one command step to an order."""
    method, suffix, body = step
    return client.request(method, f"/orders/{order_id}{suffix}", json=body, **kwargs)


def run_steps(client: TestClient, order_id: str, steps: list[Step]) -> None:
    for step in steps:
        response = send(client, order_id, step)
        assert response.status_code == 200, response.text


class TestOrderLifecycle:
    """An order placed, edited, paid, shipped, delivered and refunded, all over HTTP."""

    def test_an_order_goes_from_placed_to_delivered_and_refunded(self, client: TestClient) -> None:
        """Every command answers with the new version and position, and the state follows."""
        # Place it.
        placed = client.post("/orders", json=order_body(client_reference="cart-1"))
        assert placed.status_code == 201
        order_id = placed.json()["order_id"]
        assert placed.json()["version"] == 1
        assert placed.headers["Location"] == f"/orders/{order_id}"
        assert placed.headers["ETag"] == '"1"'
        assert placed.headers["Orderledger-Position"] == str(placed.json()["position"])

        # Edit its lines before any payment.
        steps: list[Step] = [
            ("POST", "/lines", {"sku": "SKU-3", "quantity": 3, "unit_price": 100}),
            ("DELETE", "/lines/SKU-2", None),
            ("POST", "/payments", {"amount": 1000, "payment_reference": "psp-1"}),
            ("POST", "/payments", {"amount": 1800, "payment_reference": "psp-2"}),
            SHIP,
            DELIVER,
            ("POST", "/refunds", {"amount": 300, "reason": "one item damaged"}),
        ]
        positions = [placed.json()["position"]]
        for expected_version, step in enumerate(steps, start=2):
            response = send(client, order_id, step)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["order_id"] == order_id
            assert body["version"] == expected_version
            assert response.headers["ETag"] == f'"{expected_version}"'
            assert response.headers["Orderledger-Position"] == str(body["position"])
            positions.append(body["position"])
        assert positions == sorted(positions)
        assert len(set(positions)) == len(positions)

        # The order as it stands.
        state = client.get(f"/orders/{order_id}/state")
        assert state.status_code == 200
        current = state.json()
        assert current["version"] == 8
        assert current["status"] == "delivered"
        assert current["lines"] == [
            {"sku": "SKU-1", "quantity": 2, "unit_price": 1250},
            {"sku": "SKU-3", "quantity": 3, "unit_price": 100},
        ]
        assert (current["total"], current["captured"], current["refunded"]) == (2800, 2800, 300)
        assert current["payment_references"] == ["psp-1", "psp-2"]
        assert current["client_reference"] == "cart-1"
        assert (current["carrier"], current["tracking_number"]) == ("DHL", "JD0146000")
        assert current["shipped_at"] is not None
        assert current["delivered_at"] is not None

        history = client.get(f"/orders/{order_id}/history").json()["events"]
        assert [event["type"] for event in history] == [
            "OrderPlaced",
            "OrderLineAdded",
            "OrderLineRemoved",
            "PaymentCaptured",
            "PaymentCaptured",
            "OrderShipped",
            "OrderDelivered",
            "RefundIssued",
        ]
        assert [event["position"] for event in history] == positions

    def test_a_paid_order_is_cancelled_and_refunded_in_full(self, client: TestClient) -> None:
        """Cancelling leaves a refund due until the captured money is given back."""
        order_id = client.post("/orders", json=order_body()).json()["order_id"]
        run_steps(client, order_id, [PAY_SOME, CANCEL])
        cancelled = client.get(f"/orders/{order_id}/state").json()
        assert (cancelled["status"], cancelled["refund_due"]) == ("cancelled", 1000)
        assert cancelled["cancellation_reason"] == "customer changed mind"

        refund = {"amount": 1000, "reason": "order cancelled"}
        assert client.post(f"/orders/{order_id}/refunds", json=refund).status_code == 200
        refunded = client.get(f"/orders/{order_id}/state").json()
        assert (refunded["refunded"], refunded["refund_due"]) == (1000, 0)

    def test_delivery_accepts_an_empty_object_as_its_body(self, client: TestClient) -> None:
        """Delivery needs no body, but an empty JSON object is fine too."""
        order_id = client.post("/orders", json=order_body()).json()["order_id"]
        run_steps(client, order_id, [PAY_ALL, SHIP])
        response = client.post(f"/orders/{order_id}/delivery", json={})
        assert response.status_code == 200
        assert response.json()["version"] == 4


# (id, steps first, the refused step, status, problem slug, words the detail must contain)
COMMAND_REJECTIONS: list[tuple[str, list[Step], Step, int, str, str]] = [
    (
        "payment_above_total",
        [],
        ("POST", "/payments", {"amount": 3001, "payment_reference": "p1"}),
        409,
        "payment-exceeds-total",
        "would exceed the order total 3000",
    ),
    (
        "repeated_payment_reference",
        [PAY_SOME],
        ("POST", "/payments", {"amount": 1, "payment_reference": "pay-some"}),
        409,
        "duplicate-payment-reference",
        "already captured",
    ),
    ("shipping_unpaid", [PAY_SOME], SHIP, 409, "order-not-fully-paid", "until fully paid"),
    ("delivering_unshipped", [PAY_ALL], DELIVER, 409, "order-not-shipped", "before it ships"),
    (
        "delivering_twice",
        [PAY_ALL, SHIP, DELIVER],
        DELIVER,
        409,
        "order-already-delivered",
        "already been delivered",
    ),
    ("shipping_twice", [PAY_ALL, SHIP], SHIP, 409, "order-already-shipped", "already shipped"),
    (
        "cancelling_shipped",
        [PAY_ALL, SHIP],
        CANCEL,
        409,
        "order-already-shipped",
        "shipped order cannot be cancelled",
    ),
    ("cancelling_twice", [CANCEL], CANCEL, 409, "order-cancelled", "already cancelled"),
    ("paying_cancelled", [CANCEL], PAY_SOME, 409, "order-cancelled", "cancelled order"),
    ("shipping_cancelled", [PAY_ALL, CANCEL], SHIP, 409, "order-cancelled", "cancelled order"),
    (
        "adding_line_after_payment",
        [PAY_SOME],
        ("POST", "/lines", {"sku": "SKU-3", "quantity": 1, "unit_price": 1}),
        409,
        "lines-locked",
        "payment has been captured",
    ),
    (
        "removing_line_after_shipment",
        [PAY_ALL, SHIP],
        ("DELETE", "/lines/SKU-2", None),
        409,
        "lines-locked",
        "shipped order",
    ),
    (
        "adding_existing_sku",
        [],
        ("POST", "/lines", {"sku": "SKU-1", "quantity": 1, "unit_price": 1}),
        409,
        "duplicate-line",
        "already has a line for SKU 'SKU-1'",
    ),
    (
        "removing_absent_sku",
        [],
        ("DELETE", "/lines/SKU-9", None),
        409,
        "line-not-found",
        "no line for SKU 'SKU-9'",
    ),
    (
        "removing_last_line",
        [("DELETE", "/lines/SKU-2", None)],
        ("DELETE", "/lines/SKU-1", None),
        409,
        "last-line-removal",
        "at least one line",
    ),
    (
        "refund_above_captured",
        [PAY_SOME],
        ("POST", "/refunds", {"amount": 1001, "reason": "goodwill"}),
        409,
        "refund-exceeds-captured",
        "exceeds the refundable 1000",
    ),
    (
        "zero_payment",
        [],
        ("POST", "/payments", {"amount": 0, "payment_reference": "p0"}),
        422,
        "invalid-amount",
        "amount must be between 1",
    ),
    (
        "zero_quantity",
        [],
        ("POST", "/lines", {"sku": "SKU-3", "quantity": 0, "unit_price": 1}),
        422,
        "invalid-amount",
        "quantity of 'SKU-3' must be between 1 and 1000000",
    ),
    (
        "quantity_above_limit",
        [],
        ("POST", "/lines", {"sku": "SKU-3", "quantity": 1_000_001, "unit_price": 1}),
        422,
        "invalid-amount",
        "between 1 and 1000000",
    ),
    (
        "order_total_overflowing",
        [],
        ("POST", "/lines", {"sku": "SKU-3", "quantity": 1, "unit_price": 10**15}),
        422,
        "invalid-amount",
        "largest order total",
    ),
    (
        "blank_carrier",
        [PAY_ALL],
        ("POST", "/shipment", {"carrier": "   ", "tracking_number": "T1"}),
        422,
        "invalid-command",
        "carrier must not be blank",
    ),
    (
        "control_character_in_reason",
        [],
        ("POST", "/cancellation", {"reason": "bell\x07"}),
        422,
        "invalid-command",
        "reason must not contain control characters",
    ),
    (
        "newline_in_payment_reference",
        [],
        ("POST", "/payments", {"amount": 1, "payment_reference": "a\nb"}),
        422,
        "invalid-command",
        "control characters",
    ),
]


class TestDomainRejections:
    """Each rule the order enforces answers with its own problem, and records nothing."""

    @pytest.mark.parametrize(
        "case", [pytest.param(case, id=case[0]) for case in COMMAND_REJECTIONS]
    )
    def test_a_refused_command_answers_with_a_problem_naming_the_rule(
        self,
        client: TestClient,
        place_order: Callable[..., str],
        case: tuple[str, list[Step], Step, int, str, str],
    ) -> None:
        """The status and problem type name the rule, the detail says why."""
        _, steps, refused, status, slug, reason = case
        order_id = place_order()
        run_steps(client, order_id, steps)
        recorded = history_length(client, order_id)

        problem = assert_problem(send(client, order_id, refused), status, slug)

        assert reason in problem["detail"]
        assert history_length(client, order_id) == recorded

    @pytest.mark.parametrize(
        ("overrides", "status", "slug", "reason"),
        [
            pytest.param(
                {"currency": "XXX"}, 422, "invalid-currency", "not an ISO 4217", id="currency"
            ),
            pytest.param({"lines": []}, 422, "invalid-command", "at least one line", id="no_lines"),
            pytest.param(
                {"lines": [{"sku": f"S{i}", "quantity": 1, "unit_price": 1} for i in range(101)]},
                422,
                "invalid-command",
                "at most 100 lines",
                id="too_many_lines",
            ),
            pytest.param(
                {"lines": [{"sku": "A", "quantity": 1, "unit_price": 1}] * 2},
                409,
                "duplicate-line",
                "more than one line",
                id="repeated_sku",
            ),
            pytest.param(
                {"lines": [{"sku": "A", "quantity": 2, "unit_price": 10**15}]},
                422,
                "invalid-amount",
                "largest order total",
                id="total_overflow",
            ),
            pytest.param(
                {"customer_id": " "}, 422, "invalid-command", "must not be blank", id="blank"
            ),
            pytest.param(
                {"customer_id": "a\tb"}, 422, "invalid-command", "control", id="tab_in_id"
            ),
        ],
    )
    def test_a_refused_order_is_not_placed(
        self,
        client: TestClient,
        overrides: dict[str, Any],
        status: int,
        slug: str,
        reason: str,
    ) -> None:
        """Placing an order the domain refuses answers with a problem and records nothing."""
        before = head_position(client)
        problem = assert_problem(client.post("/orders", json=order_body(**overrides)), status, slug)
        assert reason in problem["detail"]
        assert head_position(client) == before

    def test_a_lone_surrogate_in_text_is_refused(self, client: TestClient) -> None:
        """Text that cannot be stored as UTF-8 is a 422, not a failure at storage time."""
        raw = b'{"customer_id": "x\\ud800", "currency": "EUR", '
        raw += b'"lines": [{"sku": "A", "quantity": 1, "unit_price": 1}]}'
        response = client.post("/orders", content=raw, headers={"content-type": "application/json"})
        problem = assert_problem(response, 422)
        assert "body.customer_id" in problem["detail"]
        assert head_position(client) == 0


class TestUnknownOrder:
    """Commands and reads on an order that does not exist answer 404."""

    @pytest.mark.parametrize(
        ("method", "suffix", "body"),
        [
            ("GET", "/history", None),
            ("GET", "/state", None),
            ("GET", "/state?version=1", None),
            PAY_SOME,
            SHIP,
            DELIVER,
            CANCEL,
            ("POST", "/refunds", {"amount": 1, "reason": "r"}),
            ("POST", "/lines", {"sku": "S", "quantity": 1, "unit_price": 1}),
            ("DELETE", "/lines/S", None),
        ],
    )
    def test_an_unknown_order_is_not_found(
        self, client: TestClient, method: str, suffix: str, body: dict[str, Any] | None
    ) -> None:
        """The problem names the order id it looked for."""
        order_id = str(uuid.uuid4())
        response = client.request(method, f"/orders/{order_id}{suffix}", json=body)
        problem = assert_problem(response, 404, "order-not-found")
        assert order_id in problem["detail"]


class TestMalformedInput:
    """Input that does not fit the schema is a 422 problem listing each bad field."""

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            pytest.param({"amount": 10.0, "payment_reference": "p"}, "body.amount", id="float"),
            pytest.param({"amount": 10.5, "payment_reference": "p"}, "body.amount", id="fraction"),
            pytest.param({"amount": "10", "payment_reference": "p"}, "body.amount", id="string"),
            pytest.param({"amount": True, "payment_reference": "p"}, "body.amount", id="bool"),
            pytest.param({"amount": None, "payment_reference": "p"}, "body.amount", id="null"),
            pytest.param({"amount": -1, "payment_reference": "p"}, "body.amount", id="negative"),
            pytest.param({"amount": 2**63, "payment_reference": "p"}, "body.amount", id="int64"),
            pytest.param({"amount": 10**40, "payment_reference": "p"}, "body.amount", id="huge"),
            pytest.param({"payment_reference": "p"}, "body.amount", id="missing"),
            pytest.param({"amount": 1, "payment_reference": 7}, "body.payment_reference", id="n"),
            pytest.param(
                {"amount": 1, "payment_reference": "p" * 129}, "body.payment_reference", id="long"
            ),
            pytest.param(
                {"amount": 1, "payment_reference": "p", "currency": "EUR"},
                "body.currency",
                id="unknown_field",
            ),
            pytest.param([{"amount": 1, "payment_reference": "p"}], "body", id="array"),
        ],
    )
    def test_a_malformed_payment_is_refused_field_by_field(
        self,
        client: TestClient,
        place_order: Callable[..., str],
        body: Any,
        field: str,
    ) -> None:
        """The problem's errors name the offending field and nothing is recorded."""
        order_id = place_order()
        response = client.post(f"/orders/{order_id}/payments", json=body)
        problem = assert_problem(response, 422, "invalid-request")
        assert field in [error["field"] for error in problem["errors"]]
        assert all(error["message"] for error in problem["errors"])
        assert history_length(client, order_id) == 1

    @pytest.mark.parametrize(
        ("overrides", "field"),
        [
            pytest.param({"currency": "eur"}, "body.currency", id="lowercase_currency"),
            pytest.param({"currency": "EURO"}, "body.currency", id="long_currency"),
            pytest.param({"currency": 978}, "body.currency", id="numeric_currency"),
            pytest.param({"customer_id": "c" * 65}, "body.customer_id", id="long_customer"),
            pytest.param({"shipping_address": "a" * 501}, "body.shipping_address", id="address"),
            pytest.param({"gift": True}, "body.gift", id="unknown_field"),
            pytest.param(
                {"lines": [{"sku": "A", "quantity": 1, "unit_price": 1, "discount": 1}]},
                "body.lines.0.discount",
                id="unknown_line_field",
            ),
            pytest.param(
                {"lines": [{"sku": "A", "quantity": 1.0, "unit_price": 1}]},
                "body.lines.0.quantity",
                id="float_quantity",
            ),
            pytest.param(
                {"lines": [{"sku": "A", "quantity": 1, "unit_price": 9.99}]},
                "body.lines.0.unit_price",
                id="float_price",
            ),
            pytest.param({"lines": {"sku": "A"}}, "body.lines", id="lines_object"),
        ],
    )
    def test_a_malformed_order_is_refused_field_by_field(
        self, client: TestClient, overrides: dict[str, Any], field: str
    ) -> None:
        """Each schema violation of a new order is a 422 naming the field."""
        before = head_position(client)
        problem = assert_problem(client.post("/orders", json=order_body(**overrides)), 422)
        assert field in [error["field"] for error in problem["errors"]]
        assert field in problem["detail"]
        assert head_position(client) == before

    def test_a_body_that_is_not_json_is_refused(self, client: TestClient) -> None:
        """Broken JSON is a 422 problem saying where it broke."""
        response = client.post(
            "/orders", content=b'{"customer_id": ', headers={"content-type": "application/json"}
        )
        problem = assert_problem(response, 422, "malformed-json")
        assert "not valid JSON" in problem["detail"]

    def test_an_order_id_that_is_not_a_uuid_is_refused(self, client: TestClient) -> None:
        """A path id that is not a UUID is a 422 on the path parameter."""
        problem = assert_problem(client.get("/orders/not-a-uuid/history"), 422)
        assert [error["field"] for error in problem["errors"]] == ["path.order_id"]

    def test_a_sku_longer_than_any_sku_is_refused(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """Removing a line names the SKU in the path; one too long for any line is a 422."""
        response = client.delete(f"/orders/{place_order()}/lines/{'S' * 65}")
        problem = assert_problem(response, 422)
        assert [error["field"] for error in problem["errors"]] == ["path.sku"]

    @pytest.mark.parametrize(
        "if_match", ["3", "abc", '"-1"', '"0"', 'W/"1"', '"1", "2"', f'"{2**63}"', '""']
    )
    def test_a_malformed_if_match_is_refused(
        self, client: TestClient, place_order: Callable[..., str], if_match: str
    ) -> None:
        """If-Match takes "*" or one quoted version; anything else is a 422, not a guess."""
        order_id = place_order()
        response = send(client, order_id, PAY_SOME, headers={"If-Match": if_match})
        problem = assert_problem(response, 422, "invalid-request")
        assert problem["errors"][0]["field"] == "header.If-Match"
        assert history_length(client, order_id) == 1

    @pytest.mark.parametrize("key", ["", "k" * 256])
    def test_an_idempotency_key_of_the_wrong_length_is_refused(
        self, client: TestClient, key: str
    ) -> None:
        """Keys are 1 to 255 characters."""
        before = head_position(client)
        response = client.post("/orders", json=order_body(), headers={"Idempotency-Key": key})
        problem = assert_problem(response, 422, "invalid-command")
        assert "idempotency key" in problem["detail"]
        assert head_position(client) == before


class TestConditionalCommands:
    """If-Match makes a command conditional on the order's version."""

    def test_a_stale_if_match_is_refused_with_the_current_version(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """The 412 problem says which version the order is at, and nothing is recorded."""
        order_id = place_order()
        run_steps(client, order_id, [PAY_SOME])

        response = send(client, order_id, CANCEL, headers={"If-Match": '"1"'})

        problem = assert_problem(response, 412, "concurrency-conflict")
        assert problem["current_version"] == 2
        assert "not the expected 1" in problem["detail"]
        assert history_length(client, order_id) == 2

    def test_a_current_if_match_lets_the_command_through(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """The ETag of one response is the If-Match of the next."""
        order_id = place_order()
        first = send(client, order_id, PAY_SOME, headers={"If-Match": '"1"'})
        assert first.status_code == 200
        second = send(client, order_id, CANCEL, headers={"If-Match": first.headers["ETag"]})
        assert second.status_code == 200
        assert second.json()["version"] == 3

    def test_if_match_star_accepts_any_version(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """If-Match: * only asks that the order exists."""
        order_id = place_order()
        run_steps(client, order_id, [PAY_SOME])
        assert send(client, order_id, CANCEL, headers={"If-Match": "*"}).status_code == 200

    def test_of_racing_commands_on_the_same_version_exactly_one_wins(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """Concurrent requests naming version 1: one is recorded, the others get 412."""
        order_id = place_order()
        racers = 4
        barrier = threading.Barrier(racers)

        def pay(n: int) -> Any:
            barrier.wait()
            body = {"amount": 100, "payment_reference": f"race-{n}"}
            headers = {"If-Match": '"1"'}
            return client.post(f"/orders/{order_id}/payments", json=body, headers=headers)

        with ThreadPoolExecutor(racers) as pool:
            responses = list(pool.map(pay, range(racers)))

        statuses = sorted(response.status_code for response in responses)
        assert statuses == [200] + [412] * (racers - 1)
        for response in responses:
            if response.status_code == 412:
                assert assert_problem(response, 412)["current_version"] == 2
        assert history_length(client, order_id) == 2


class TestIdempotency:
    """An Idempotency-Key makes a retried POST return the first answer and record nothing."""

    def test_replaying_an_order_placement_returns_the_first_response(
        self, client: TestClient
    ) -> None:
        """Same status, body and headers; no second order."""
        headers = {"Idempotency-Key": "place-1"}
        first = client.post("/orders", json=order_body(), headers=headers)
        position = head_position(client)

        replay = client.post("/orders", json=order_body(), headers=headers)

        assert first.status_code == replay.status_code == 201
        assert replay.json() == first.json()
        for name in ("Location", "ETag", "Orderledger-Position"):
            assert replay.headers[name] == first.headers[name]
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in first.headers
        assert head_position(client) == position

    def test_replaying_a_payment_after_the_order_moved_on_returns_the_first_result(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """The replay answers with the version the payment made, not the order's latest."""
        order_id = place_order()
        headers = {"Idempotency-Key": "pay-1"}
        first = send(client, order_id, PAY_SOME, headers=headers)
        run_steps(client, order_id, [CANCEL])

        replay = send(client, order_id, PAY_SOME, headers=headers)

        assert replay.status_code == 200
        assert replay.json() == first.json() == {**first.json(), "version": 2}
        assert history_length(client, order_id) == 3

    def test_reusing_a_key_for_a_different_body_is_refused(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """Same key, different command: 422 and nothing recorded."""
        order_id = place_order()
        headers = {"Idempotency-Key": "pay-2"}
        assert send(client, order_id, PAY_SOME, headers=headers).status_code == 200
        other = ("POST", "/payments", {"amount": 999, "payment_reference": "pay-other"})

        problem = assert_problem(
            send(client, order_id, other, headers=headers), 422, "idempotency-key-reused"
        )

        assert "'pay-2'" in problem["detail"]
        assert history_length(client, order_id) == 2

    def test_reusing_a_key_on_another_order_is_refused(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """A key names one command on one order."""
        first, second = place_order(), place_order()
        headers = {"Idempotency-Key": "cancel-1"}
        assert send(client, first, CANCEL, headers=headers).status_code == 200
        assert_problem(send(client, second, CANCEL, headers=headers), 422, "idempotency-key-reused")
        assert history_length(client, second) == 1


class TestAuditReads:
    """History and point-in-time state of one order."""

    def test_history_lists_every_event_with_its_position_version_and_data(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """Events come oldest first with their recorded data."""
        order_id = place_order()
        run_steps(client, order_id, [PAY_SOME])

        history = client.get(f"/orders/{order_id}/history").json()

        assert history["order_id"] == order_id
        placed, paid = history["events"]
        assert (placed["type"], placed["version"]) == ("OrderPlaced", 1)
        assert placed["data"]["customer_id"] == "cust-42"
        assert placed["data"]["lines"] == order_body()["lines"]
        assert (paid["type"], paid["version"]) == ("PaymentCaptured", 2)
        assert paid["data"] == {"amount": 1000, "payment_reference": "pay-some"}
        assert placed["position"] < paid["position"]
        assert datetime.fromisoformat(placed["timestamp"]).tzinfo is not None
        assert placed["timestamp"] <= paid["timestamp"]

    def test_state_at_a_version_is_the_order_as_it_was_then(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """Version 2 shows the first payment and not the cancellation."""
        order_id = place_order()
        run_steps(client, order_id, [PAY_SOME, CANCEL])

        then = client.get(f"/orders/{order_id}/state", params={"version": 2}).json()
        now = client.get(f"/orders/{order_id}/state").json()

        assert (then["version"], then["status"], then["captured"]) == (2, "partially_paid", 1000)
        assert (now["version"], now["status"]) == (3, "cancelled")

    def test_state_at_a_moment_is_the_order_as_it_was_then(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """The moment of the payment event shows the order paid but not yet cancelled."""
        order_id = place_order()
        run_steps(client, order_id, [PAY_SOME, CANCEL])
        paid_at = client.get(f"/orders/{order_id}/history").json()["events"][1]["timestamp"]

        response = client.get(f"/orders/{order_id}/state", params={"at": paid_at})

        assert response.status_code == 200, response.text
        assert (response.json()["version"], response.json()["status"]) == (2, "partially_paid")

    def test_state_before_the_order_existed_is_not_found(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """A moment before placement has no order to show."""
        order_id = place_order()
        response = client.get(f"/orders/{order_id}/state", params={"at": "2000-01-01T00:00:00Z"})
        assert "did not exist yet" in assert_problem(response, 404, "order-not-found")["detail"]

    def test_state_beyond_the_latest_version_is_not_found(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """Asking for version 5 of a one-event order is a 404 saying the latest version."""
        order_id = place_order()
        response = client.get(f"/orders/{order_id}/state", params={"version": 5})
        assert "latest is 1" in assert_problem(response, 404, "order-not-found")["detail"]

    def test_state_by_version_and_moment_at_once_is_refused(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """One or the other, not both."""
        order_id = place_order()
        params = {"version": "1", "at": "2030-01-01T00:00:00Z"}
        response = client.get(f"/orders/{order_id}/state", params=params)
        assert "not both" in assert_problem(response, 422, "invalid-command")["detail"]

    def test_state_at_a_moment_without_a_timezone_is_refused(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        """A naive moment is ambiguous."""
        order_id = place_order()
        response = client.get(f"/orders/{order_id}/state", params={"at": "2030-01-01T00:00:00"})
        assert "timezone" in assert_problem(response, 422, "invalid-command")["detail"]

    @pytest.mark.parametrize(
        ("params", "field"),
        [
            ({"version": "0"}, "query.version"),
            ({"version": "-1"}, "query.version"),
            ({"version": "1.5"}, "query.version"),
            ({"version": "two"}, "query.version"),
            ({"version": str(2**63)}, "query.version"),
            ({"at": "yesterday"}, "query.at"),
            ({"at": "2030-13-45T00:00:00Z"}, "query.at"),
        ],
    )
    def test_a_malformed_point_in_time_is_refused(
        self,
        client: TestClient,
        place_order: Callable[..., str],
        params: dict[str, str],
        field: str,
    ) -> None:
        """Versions are positive int64s and moments are ISO 8601."""
        response = client.get(f"/orders/{place_order()}/state", params=params)
        assert [error["field"] for error in assert_problem(response, 422)["errors"]] == [field]


class TestOnEveryStore:
    """The HTTP surface behaves the same on SQLite and PostgreSQL."""

    def test_an_order_lifecycle_with_a_refusal_a_condition_and_a_replay(
        self, store_client: TestClient
    ) -> None:
        """Place, pay, ship, refuse a cancellation, refuse a stale If-Match, replay a key."""
        placed = store_client.post("/orders", json=order_body(), headers={"Idempotency-Key": "k1"})
        assert placed.status_code == 201
        order_id = placed.json()["order_id"]
        run_steps(store_client, order_id, [PAY_ALL, SHIP])

        assert_problem(send(store_client, order_id, CANCEL), 409, "order-already-shipped")
        stale = send(store_client, order_id, DELIVER, headers={"If-Match": '"2"'})
        assert assert_problem(stale, 412)["current_version"] == 3
        replay = store_client.post("/orders", json=order_body(), headers={"Idempotency-Key": "k1"})
        assert replay.json() == placed.json()

        assert history_length(store_client, order_id) == 3
        state = store_client.get(f"/orders/{order_id}/state", params={"version": 2}).json()
        assert (state["status"], state["captured"]) == ("paid", 3000)
