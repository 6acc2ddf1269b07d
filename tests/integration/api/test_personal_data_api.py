"""GET and DELETE /customers/{id}/personal-data: the right of access and erasure, for admins."""

from __future__ import annotations

from fastapi.testclient import TestClient

from domain.personal import ERASED
from tests.support.http import assert_problem, order_body
from tests.support.raw_events import values_held

EMAIL = "ana.lopez@example.com"
ADDRESS = "Calle Mayor 7, 28013 Madrid"


def _placed(client: TestClient, customer_id: str) -> tuple[str, int]:
    placed = client.post(
        "/orders",
        json=order_body(customer_id=customer_id, customer_email=EMAIL, shipping_address=ADDRESS),
    )
    assert placed.status_code == 201, placed.text
    return placed.json()["order_id"], placed.json()["position"]


class TestAccessAndErasure:
    def test_export_then_erase_then_every_read_shows_the_placeholder(
        self, client: TestClient
    ) -> None:
        order_id, position = _placed(client, "cust-ana")
        _placed(client, "cust-ben")
        client.get(f"/orders/{order_id}", params={"min_position": position})

        held = client.get("/customers/cust-ana/personal-data")
        assert held.status_code == 200, held.text
        assert held.json()["data_keys"] is True
        [order] = held.json()["orders"]
        assert (order["order_id"], order["customer_email"], order["shipping_address"]) == (
            order_id,
            EMAIL,
            ADDRESS,
        )

        erased = client.delete(
            "/customers/cust-ana/personal-data", params={"reason": "GDPR request, ticket 42"}
        )
        assert erased.status_code == 200, erased.text
        assert erased.json()["keys_erased"] == 1

        after = client.get("/customers/cust-ana/personal-data").json()
        assert after["data_keys"] is False
        assert after["orders"][0]["shipping_address"] == ERASED
        history = client.get(f"/orders/{order_id}/history").json()["events"]
        assert history[0]["data"]["customer_email"] == ERASED
        assert history[0]["data"]["lines"] == order_body()["lines"]
        state = client.get(f"/orders/{order_id}/state").json()
        assert state["total"] == 3000
        other = client.get("/customers/cust-ben/personal-data").json()
        assert other["orders"][0]["shipping_address"] == ADDRESS

    def test_the_erasure_is_in_the_audit_log_with_who_asked(self, client: TestClient) -> None:
        _placed(client, "cust-ana")
        erased = client.delete("/customers/cust-ana/personal-data", params={"reason": "asked"})
        position = erased.json()["position"]
        logged = client.get(
            "/audit", params={"event_type": "PersonalDataErased", "min_position": position}
        ).json()["data"]
        assert [entry["position"] for entry in logged] == [position]
        assert logged[0]["actor"]["role"] == "admin"

    def test_a_reason_is_required_and_an_unknown_customer_is_not_found(
        self, client: TestClient
    ) -> None:
        assert_problem(client.delete("/customers/cust-ana/personal-data"), 422)
        assert_problem(client.get("/customers/nobody/personal-data"), 404)

    def test_only_admins(self, client: TestClient, auth_headers: object) -> None:
        for role in ("reader", "writer", "auditor"):
            headers = auth_headers(role)  # type: ignore[operator]
            assert_problem(client.get("/customers/x/personal-data", headers=headers), 403)
            assert_problem(
                client.delete(
                    "/customers/x/personal-data", params={"reason": "r"}, headers=headers
                ),
                403,
            )


def test_no_table_holds_the_values_after_an_erasure(store_client: TestClient) -> None:
    """Orders placed with idempotency keys, read, exported and erased: nothing is left."""
    url = str(store_client.app.state.settings.database_url)  # type: ignore[attr-defined]
    placed = store_client.post(
        "/orders",
        json=order_body(customer_id="cust-ana", customer_email=EMAIL, shipping_address=ADDRESS),
        headers={"Idempotency-Key": "place-ana-1"},
    )
    assert placed.status_code == 201, placed.text
    store_client.get(f"/orders/{placed.json()['order_id']}", params={"min_position": 1})
    assert store_client.get("/customers/cust-ana/personal-data").status_code == 200
    assert values_held(url, ["cust-ana", EMAIL, ADDRESS]) == ["cust-ana"]

    erased = store_client.delete(
        "/customers/cust-ana/personal-data",
        params={"reason": "GDPR request"},
        headers={"Idempotency-Key": "erase-ana-1"},
    )
    assert erased.status_code == 200, erased.text

    assert values_held(url, [EMAIL, ADDRESS]) == []
