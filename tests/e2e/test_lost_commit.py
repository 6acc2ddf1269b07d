"""A commit the server made but whose acknowledgement was lost is answered once, truthfully.

A proxy between `orderledger serve` and PostgreSQL forwards the statement that appends a
command's events, which commits on its own, and closes the server's connection before the
answer comes back; the library retries the insert and meets the rows it has just written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest

from tests.e2e.conftest import Deploy
from tests.support.http import order_body
from tests.support.postgres_proxy import CommitAckDroppingProxy, commit_ack_dropping_proxy
from tests.support.processes import Server

pytestmark = pytest.mark.postgres


@dataclass(frozen=True)
class Scenario:
    """A command sent while its commit acknowledgement is lost, and what it must record."""

    path: str
    body: dict[str, Any]
    event_type: str
    version: int
    check: Callable[[dict[str, Any]], bool]


SCENARIOS = {
    "placement": Scenario("", order_body(customer_id="cust-lost-ack"), "OrderPlaced", 1, bool),
    "payment": Scenario(
        "/payments",
        {"amount": 1000, "payment_reference": "psp-lost-ack"},
        "PaymentCaptured",
        2,
        lambda state: state["captured"] == 1000,
    ),
    "refund": Scenario(
        "/refunds",
        {"amount": 100, "reason": "chipped"},
        "RefundIssued",
        3,
        lambda state: (state["captured"], state["refunded"]) == (3000, 100),
    ),
    "line change": Scenario(
        "/lines",
        {"sku": "SKU-9", "quantity": 1, "unit_price": 700},
        "OrderLineAdded",
        2,
        lambda state: state["total"] == 3700,
    ),
}


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[CommitAckDroppingProxy]:
    with commit_ack_dropping_proxy(postgres_url) as running:
        yield running


@pytest.fixture
def proxied_server(postgres_url: str, proxy: CommitAckDroppingProxy, deploy: Deploy) -> Server:
    """`orderledger serve` whose every PostgreSQL connection goes through the proxy."""
    return deploy(proxy.url(postgres_url)).serve(run_projections=False)


def _placed_orders(postgres_url: str) -> int:
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM orderledger_events WHERE topic LIKE %s", ("%Order.Placed",)
        ).fetchone()
    assert row is not None
    return int(row[0])


def _prepare(http: httpx.Client, name: str) -> str:
    """An order in the state the scenario's command needs; its id."""
    placed = http.post("/orders", json=order_body())
    assert placed.status_code == 201, placed.text
    order_id: str = placed.json()["order_id"]
    if name == "refund":
        paid = http.post(
            f"/orders/{order_id}/payments", json={"amount": 3000, "payment_reference": "psp-1"}
        )
        assert paid.status_code == 200, paid.text
    return order_id


class TestLostCommitAcknowledgement:
    """The command is recorded once and answered with its recorded result, not a 503 or a copy."""

    @pytest.mark.parametrize("idempotency_key", [None, "retry-me"], ids=["no-key", "with-key"])
    @pytest.mark.parametrize("name", list(SCENARIOS))
    def test_a_command_whose_commit_answer_is_lost_is_recorded_once(
        self,
        name: str,
        idempotency_key: str | None,
        proxied_server: Server,
        proxy: CommitAckDroppingProxy,
        postgres_url: str,
    ) -> None:
        """The answer is the command's success; the history holds its event exactly once."""
        scenario = SCENARIOS[name]
        headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
        with proxied_server.client() as http:
            order_id = None if name == "placement" else _prepare(http, name)
            path = "/orders" if order_id is None else f"/orders/{order_id}{scenario.path}"
            proxy.arm()
            answer = http.post(path, json=scenario.body, headers=headers)
            assert proxy.dropped == 1, "the fault was not injected"

            success = 201 if name == "placement" else 200
            assert answer.status_code == success, answer.text
            assert "Idempotent-Replayed" not in answer.headers
            order_id = answer.json()["order_id"]
            assert answer.json()["version"] == scenario.version
            history = http.get(f"/orders/{order_id}/history").json()["events"]
            recorded = [event for event in history if event["type"] == scenario.event_type]
            assert len(recorded) == 1, history
            assert answer.json()["position"] == recorded[0]["position"]
            state = http.get(f"/orders/{order_id}/state").json()
            assert scenario.check(state), state
            if idempotency_key is not None:
                again = http.post(path, json=scenario.body, headers=headers)
                assert again.status_code == success, again.text
                assert again.headers["Idempotent-Replayed"] == "true"
                assert again.json() == answer.json()
        assert _placed_orders(postgres_url) == 1
