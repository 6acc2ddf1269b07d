"""Input bounds over HTTP: every malformed or oversized input is a problem naming it, never a
500 and never a partial write; and the OpenAPI document says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from api.http.app import MAX_BODY_BYTES
from api.http.schemas import commands, reads
from domain.money import MAX_AMOUNT
from tests.support.http import assert_problem, head_position, order_body

NIL = "00000000-0000-0000-0000-000000000000"


def line(**overrides: Any) -> dict[str, Any]:
    return {"sku": "SKU-1", "quantity": 1, "unit_price": 100, **overrides}


def refused_field(response: Any, field: str) -> dict[str, Any]:
    """A 422 validation problem whose field errors name ``field``."""
    problem = assert_problem(response, 422, "invalid-request")
    assert field in [error["field"] for error in problem["errors"]], problem
    assert field in problem["detail"]
    return problem


class TestUnknownFields:
    """A field the API does not know is refused by name, at any depth, on every body."""

    @pytest.mark.parametrize(
        ("suffix", "body", "field"),
        [
            ("/lines", {**line(), "colour": "red"}, "body.colour"),
            ("/payments", {"amount": 1, "payment_reference": "p", "fee": 1}, "body.fee"),
            ("/shipment", {"carrier": "DHL", "tracking_number": "T", "eta": "x"}, "body.eta"),
            ("/delivery", {"signed_by": "Ada"}, "body.signed_by"),
            ("/cancellation", {"reason": "r", "refund": True}, "body.refund"),
            ("/refunds", {"amount": 1, "reason": "r", "to": "card"}, "body.to"),
        ],
    )
    def test_on_order_commands(
        self,
        client: TestClient,
        place_order: Callable[..., str],
        suffix: str,
        body: dict[str, Any],
        field: str,
    ) -> None:
        order_id = place_order()
        head = head_position(client)
        refused_field(client.post(f"/orders/{order_id}{suffix}", json=body), field)
        assert head_position(client) == head

    def test_on_a_new_order_and_inside_its_lines(self, client: TestClient) -> None:
        refused_field(client.post("/orders", json=order_body(discount=5)), "body.discount")
        body = order_body(lines=[line(), line(sku="SKU-2", tax=1)])
        refused_field(client.post("/orders", json=body), "body.lines.1.tax")
        assert head_position(client) == 0

    def test_on_a_webhook_subscription(self, client: TestClient) -> None:
        body = {"url": "https://example.com/h", "event_types": ["*"], "secret": "mine"}
        refused_field(client.post("/webhooks", json=body), "body.secret")
        assert client.get("/webhooks").json()["data"] == []


class TestSizes:
    @pytest.mark.parametrize(
        ("overrides", "field"),
        [
            ({"customer_id": "c" * 65}, "body.customer_id"),
            ({"customer_id": ""}, "body.customer_id"),
            ({"client_reference": "r" * 129}, "body.client_reference"),
            ({"shipping_address": "a" * 501}, "body.shipping_address"),
            ({"customer_email": "e" * 255}, "body.customer_email"),
            ({"lines": [line(sku="s" * 65)]}, "body.lines.0.sku"),
        ],
    )
    def test_a_string_over_its_length_is_refused_by_name(
        self, client: TestClient, overrides: dict[str, Any], field: str
    ) -> None:
        refused_field(client.post("/orders", json=order_body(**overrides)), field)
        assert head_position(client) == 0

    def test_an_order_holds_at_most_a_hundred_lines(self, client: TestClient) -> None:
        lines = [line(sku=f"S-{i}") for i in range(101)]
        problem = assert_problem(client.post("/orders", json=order_body(lines=lines)), 422)
        assert "at most 100 lines" in problem["detail"]
        assert head_position(client) == 0
        placed = client.post("/orders", json=order_body(lines=lines[:100]))
        assert placed.status_code == 201, placed.text

    def test_a_body_over_the_cap_is_a_413_problem(self, client: TestClient) -> None:
        body = order_body(shipping_address="a" * MAX_BODY_BYTES)
        problem = assert_problem(client.post("/orders", json=body), 413)
        assert str(MAX_BODY_BYTES) in problem["detail"]
        assert head_position(client) == 0


class TestAmounts:
    def test_the_largest_price_is_accepted(self, client: TestClient) -> None:
        body = order_body(lines=[line(unit_price=MAX_AMOUNT)])
        placed = client.post("/orders", json=body)
        assert placed.status_code == 201, placed.text
        state = client.get(f"/orders/{placed.json()['order_id']}/state").json()
        assert state["total"] == MAX_AMOUNT

    @pytest.mark.parametrize(
        ("price", "field"),
        [
            (MAX_AMOUNT + 1, "body.lines.0.unit_price"),
            (-1, "body.lines.0.unit_price"),
            (10.0, "body.lines.0.unit_price"),
            ("10", "body.lines.0.unit_price"),
            (True, "body.lines.0.unit_price"),
        ],
    )
    def test_money_above_the_largest_or_not_an_integer_is_refused(
        self, client: TestClient, price: object, field: str
    ) -> None:
        refused_field(
            client.post("/orders", json=order_body(lines=[line(unit_price=price)])), field
        )
        assert head_position(client) == 0

    def test_a_total_beyond_the_largest_is_refused_whole(self, client: TestClient) -> None:
        lines = [line(sku="A", unit_price=MAX_AMOUNT), line(sku="B", unit_price=1)]
        problem = assert_problem(client.post("/orders", json=order_body(lines=lines)), 422)
        assert "largest order total" in problem["detail"]
        assert head_position(client) == 0

    def test_a_payment_beyond_the_largest_amount_is_refused(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        order_id = place_order()
        body = {"amount": MAX_AMOUNT + 1, "payment_reference": "p"}
        refused_field(client.post(f"/orders/{order_id}/payments", json=body), "body.amount")


class TestCurrencies:
    @pytest.mark.parametrize("code", ["eur", "EURO", "E1R", ""])
    def test_a_code_of_the_wrong_shape_is_refused_by_name(
        self, client: TestClient, code: str
    ) -> None:
        refused_field(client.post("/orders", json=order_body(currency=code)), "body.currency")

    @pytest.mark.parametrize("code", ["XXX", "ABC", "DEM"])
    def test_a_code_that_is_no_active_iso_4217_currency_is_refused(
        self, client: TestClient, code: str
    ) -> None:
        problem = assert_problem(
            client.post("/orders", json=order_body(currency=code)), 422, "invalid-currency"
        )
        assert "ISO 4217" in problem["detail"]
        assert head_position(client) == 0

    def test_the_schema_lists_the_codes_it_accepts(self, client: TestClient) -> None:
        schema = client.get("/openapi.json").json()
        currency = schema["components"]["schemas"]["OrderCreate"]["properties"]["currency"]
        assert {"EUR", "JPY", "BHD"} <= set(currency["enum"])
        assert "XXX" not in currency["enum"]


class TestQueryAndPathBounds:
    @pytest.mark.parametrize(
        ("path", "params", "field"),
        [
            ("/orders", {"limit": "0"}, "query.limit"),
            ("/orders", {"limit": "201"}, "query.limit"),
            ("/orders", {"min_position": "-1"}, "query.min_position"),
            ("/orders", {"min_position": str(2**63)}, "query.min_position"),
            ("/orders", {"min_position": "99"}, "query.min_position"),
            ("/orders", {"cursor": "c" * 513}, "query.cursor"),
            ("/reports/top-skus", {"limit": "101"}, "query.limit"),
            ("/reports/top-skus", {"currency": "eur"}, "query.currency"),
            ("/reports/daily-sales", {"from": "2020-01-01", "to": "2021-12-31"}, "query.to"),
            ("/effects", {"limit": "1001"}, "query.limit"),
            ("/orders", {"placed_to": "0"}, "query.placed_to"),
            ("/orders", {"placed_from": "1700000000"}, "query.placed_from"),
            ("/reports/daily-sales", {"from": "0", "to": "2026-01-01"}, "query.from"),
            ("/reports/daily-sales", {"from": "2026-01-01", "to": "20260102"}, "query.to"),
        ],
    )
    def test_query_parameters_out_of_bounds_are_refused_by_name(
        self, client: TestClient, path: str, params: dict[str, str], field: str
    ) -> None:
        refused_field(client.get(path, params=params), field)

    @pytest.mark.parametrize(
        ("method", "path", "field"),
        [
            ("GET", "/orders/not-a-uuid/state", "path.order_id"),
            ("POST", "/orders/12345/delivery", "path.order_id"),
            ("DELETE", f"/orders/{NIL}/lines/{'s' * 65}", "path.sku"),
            ("GET", "/effects/bad$id", "path.effect_id"),
            ("DELETE", f"/webhooks/{'w' * 65}", "path.subscription_id"),
            ("GET", f"/projections/{'p' * 65}", "path.name"),
        ],
    )
    def test_malformed_path_parameters_are_refused_by_name(
        self, client: TestClient, method: str, path: str, field: str
    ) -> None:
        refused_field(client.request(method, path), field)


class TestBodiesThatAreNotJson:
    @pytest.mark.parametrize(
        "raw", [b"{", b"\x80", b'{"customer_id": "\xff"}', b"", b"\xef\xbb\xbf{}"]
    )
    def test_malformed_json_is_a_422_problem(self, client: TestClient, raw: bytes) -> None:
        response = client.post("/orders", content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert head_position(client) == 0

    @pytest.mark.parametrize(
        "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml", None]
    )
    def test_a_body_of_another_type_is_a_415_problem(
        self, client: TestClient, content_type: str | None
    ) -> None:
        headers = {} if content_type is None else {"Content-Type": content_type}
        response = client.post("/orders", content=json.dumps(order_body()), headers=headers)
        problem = assert_problem(response, 415, "unsupported-media-type")
        assert "application/json" in problem["detail"]
        assert head_position(client) == 0

    def test_json_with_a_charset_or_a_json_suffix_is_accepted(self, client: TestClient) -> None:
        for content_type in ("application/json; charset=utf-8", "application/vnd.order+json"):
            response = client.post(
                "/orders", content=json.dumps(order_body()), headers={"Content-Type": content_type}
            )
            assert response.status_code == 201, response.text

    def test_a_command_without_a_body_needs_no_content_type(
        self, client: TestClient, place_order: Callable[..., str]
    ) -> None:
        order_id = place_order()
        client.post(f"/orders/{order_id}/payments", json={"amount": 3000, "payment_reference": "p"})
        client.post(f"/orders/{order_id}/shipment", json={"carrier": "DHL", "tracking_number": "T"})
        assert client.post(f"/orders/{order_id}/delivery").status_code == 200


class TestMethods:
    @pytest.mark.parametrize(
        ("method", "path", "allowed"),
        [
            ("PUT", "/orders", "GET, POST"),
            ("OPTIONS", "/webhooks", "GET, POST"),
            ("GET", f"/orders/{NIL}/lines/SKU-1", "DELETE"),
            ("PATCH", f"/orders/{NIL}", "GET"),
        ],
    )
    def test_a_wrong_method_lists_every_method_the_path_serves(
        self, client: TestClient, method: str, path: str, allowed: str
    ) -> None:
        """Two routers may serve one path (commands and queries): Allow names them all."""
        response = client.request(method, path)
        assert_problem(response, 405, "method-not-allowed")
        assert response.headers["Allow"] == allowed


class TestTheOpenApiDocument:
    """The contract as published: ids, examples, headers and problems for every operation."""

    @pytest.fixture
    def operations(self, client: TestClient) -> list[tuple[str, str, dict[str, Any]]]:
        schema = client.get("/openapi.json").json()
        return [
            (method.upper(), path, operation)
            for path, methods in schema["paths"].items()
            for method, operation in methods.items()
        ]

    def test_operation_ids_are_readable_and_unique(
        self, operations: list[tuple[str, str, dict[str, Any]]]
    ) -> None:
        ids = [op["operationId"] for _, _, op in operations]
        assert len(ids) == len(set(ids))
        assert {"create_order", "read_order", "create_webhook", "read_readiness"} <= set(ids)
        assert all(op_id.isidentifier() and "_orders_" not in op_id for op_id in ids), ids

    def test_every_request_body_has_an_example(self, client: TestClient) -> None:
        schema = client.get("/openapi.json").json()
        models = schema["components"]["schemas"]
        for path, methods in schema["paths"].items():
            for operation in methods.values():
                content = operation.get("requestBody", {}).get("content", {})
                for media in content.values():
                    ref = media["schema"].get("$ref") or media["schema"]["anyOf"][0]["$ref"]
                    model = models[ref.rsplit("/", 1)[-1]]
                    # An empty body (delivery) has nothing to exemplify.
                    if model.get("properties") and not _elsewhere(path):
                        assert model.get("examples"), (path, ref)

    def test_every_success_response_has_an_example(self, client: TestClient) -> None:
        schema = client.get("/openapi.json").json()
        models = schema["components"]["schemas"]
        for path, methods in schema["paths"].items():
            for method, operation in methods.items():
                for status, response in operation["responses"].items():
                    json_content = response.get("content", {}).get("application/json")
                    if not status.startswith("2") or json_content is None or _elsewhere(path):
                        continue
                    name = json_content["schema"]["$ref"].rsplit("/", 1)[-1]
                    assert models[name].get("examples"), (method, path, status, name)

    @pytest.mark.parametrize("module", [commands, reads])
    def test_every_example_is_valid_for_its_model(self, module: ModuleType) -> None:
        checked = 0
        for model in vars(module).values():
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                continue
            extra = model.model_config.get("json_schema_extra")
            for example in extra.get("examples", []) if isinstance(extra, dict) else []:
                model.model_validate(example)
                checked += 1
        assert checked >= 8

    def test_every_write_documents_idempotency_and_its_problems(
        self, operations: list[tuple[str, str, dict[str, Any]]]
    ) -> None:
        for method, path, operation in operations:
            if method not in {"POST", "DELETE"} or _elsewhere(path):
                continue
            headers = {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}
            assert "Idempotency-Key" in headers, (method, path)
            success = next(code for code in operation["responses"] if code.startswith("2"))
            documented = operation["responses"][success].get("headers", {})
            assert "Idempotent-Replayed" in documented, (method, path)
            for status in ("401", "403", "422"):
                problem = operation["responses"][status]
                assert "application/problem+json" in problem["content"], (method, path, status)

    def test_commands_document_their_headers_and_conditions(
        self, operations: list[tuple[str, str, dict[str, Any]]]
    ) -> None:
        commands = [(m, p, op) for m, p, op in operations if p.startswith("/orders") and m != "GET"]
        assert len(commands) == 8
        for _, path, operation in commands:
            success = operation["responses"]["201" if path == "/orders" else "200"]
            assert {"ETag", "Orderledger-Position"} <= set(success["headers"])
            assert "links" in success
            assert "409" in operation["responses"]
            assert "415" in operation["responses"]
        placing = next(op for m, p, op in commands if p == "/orders")
        assert "Location" in placing["responses"]["201"]["headers"]

    def test_reads_that_wait_document_retry_after(
        self, operations: list[tuple[str, str, dict[str, Any]]]
    ) -> None:
        read_order = next(op for m, p, op in operations if (m, p) == ("GET", "/orders/{order_id}"))
        assert "Retry-After" in read_order["responses"]["503"]["headers"]
        assert "ETag" in read_order["responses"]["304"]["headers"]


def _elsewhere(path: str) -> bool:
    """Routes documented by their own modules' conventions (keys, metrics, readiness)."""
    return path.startswith(("/keys", "/metrics", "/readyz"))
