"""HTTP tests: the app over ASGI, on real SQLite files and PostgreSQL."""

from __future__ import annotations

from typing import Any

import httpx

PROBLEM_BASE = "https://orderledger.dev/problems/"


def order_body(**overrides: Any) -> dict[str, Any]:
    """A valid order of two lines totalling 2 x 1250 + 1 x 500 = 3000 EUR cents."""
    body: dict[str, Any] = {
        "customer_id": "cust-42",
        "currency": "EUR",
        "lines": [
            {"sku": "SKU-1", "quantity": 2, "unit_price": 1250},
            {"sku": "SKU-2", "quantity": 1, "unit_price": 500},
        ],
        "shipping_address": "1 Quay Street, Dublin",
    }
    body.update(overrides)
    return body


def assert_problem(
    response: httpx.Response, status: int, slug: str | None = None
) -> dict[str, Any]:
    """Check the response is an RFC 9457 problem with that status (and type), and return it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["type"].startswith(PROBLEM_BASE)
    if slug is not None:
        assert problem["type"] == PROBLEM_BASE + slug
    assert problem["title"]
    assert problem["detail"]
    assert problem["instance"] == response.request.url.path
    return problem


def history_length(client: httpx.Client, order_id: str) -> int:
    """How many events the order has recorded."""
    response = client.get(f"/orders/{order_id}/history")
    assert response.status_code == 200, response.text
    return len(response.json()["events"])


def head_position(client: httpx.Client) -> int:
    """The global position of the newest event in the whole store, as GET /projections says.

    Unchanged means nothing was recorded; it says nothing of how many events a later write
    adds, since positions have gaps (a failed insert still uses one up on PostgreSQL).
    """
    response = client.get("/projections")
    assert response.status_code == 200, response.text
    return int(response.json()["data"][0]["head"])
