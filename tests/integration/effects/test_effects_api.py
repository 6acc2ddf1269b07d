"""Side effects over HTTP: webhook subscriptions, the outbox, retries and readiness.

The app runs with its lifespan (embedded worker, dispatcher and reconciler) on a real store and
delivers to a real HTTP receiver on loopback.
"""

from __future__ import annotations

import json
import logging
import socket
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import delete
from starlette.exceptions import StarletteDeprecationWarning

from api.http.app import create_app
from api.settings import Settings
from projections.effects.outbox import effects
from projections.effects.senders import verify
from projections.engine.database import read_model_engine
from tests import LOCAL_RECEIVERS
from tests.support.auth import admin
from tests.support.http import assert_problem, order_body
from tests.support.receivers import WebhookReceiver
from tests.support.waiting import wait_for

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

WAIT = 30.0


def fast_settings(url: str, **overrides: Any) -> Settings:
    """Settings that make retries quick and dead letters come after two attempts."""
    values: dict[str, Any] = {
        "database_url": url,
        "webhook_allowed_networks": LOCAL_RECEIVERS,
        "effect_backoff_base": 0.01,
        "effect_backoff_cap": 0.05,
        "effect_max_attempts": 2,
        "effect_timeout": 5.0,
        "projection_idle_wait": 0.05,
        "projection_poll_interval": 0.01,
    }
    values.update(overrides)
    return Settings(**values)


def count(client: TestClient, status: str) -> int:
    """How many effects the outbox holds in that status (the list is capped well above)."""
    response = client.get("/effects", params={"status": status, "limit": 1000})
    assert response.status_code == 200, response.text
    return len(response.json()["data"])


def subscribe(client: TestClient, url: str, event_types: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"url": url}
    if event_types is not None:
        body["event_types"] = event_types
    response = client.post("/webhooks", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def place_order(client: TestClient) -> str:
    response = client.post("/orders", json=order_body())
    assert response.status_code == 201, response.text
    return str(response.json()["order_id"])


def delete_outbox_rows(url: str, ids: list[str]) -> None:
    """Lose outbox rows as a restore from an older backup would."""
    engine = read_model_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(delete(effects).where(effects.c.id.in_(ids)))
    finally:
        engine.dispose()


@pytest.fixture
def client(sqlite_url: str) -> Iterator[TestClient]:
    """The app on a fresh SQLite file, with its worker, dispatcher and reconciler running."""
    with TestClient(create_app(fast_settings(sqlite_url)), headers=admin(sqlite_url)) as client:
        yield client


class TestWebhookSubscriptions:
    def test_a_new_subscription_shows_its_secret_once(
        self, client: TestClient, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The secret is in the creation response only: never in the list, never in the logs."""
        caplog.set_level(logging.DEBUG)
        created = subscribe(client, "https://example.com/hooks", ["OrderPlaced", "OrderShipped"])
        assert created["secret"].startswith("whsec_")
        assert created["url"] == "https://example.com/hooks"
        assert created["event_types"] == ["OrderPlaced", "OrderShipped"]
        assert created["active"] is True
        assert created["created_at"]
        listed = client.get("/webhooks")
        assert listed.status_code == 200
        [entry] = listed.json()["data"]
        assert entry["id"] == created["id"]
        assert "secret" not in entry
        assert created["secret"] not in listed.text
        assert created["secret"] not in caplog.text

    def test_a_subscription_without_event_types_gets_every_type(self, client: TestClient) -> None:
        """Leaving out event_types subscribes to all of them ("*")."""
        assert subscribe(client, "http://127.0.0.1:9/hooks")["event_types"] == ["*"]

    def test_removing_a_subscription_takes_it_off_the_list(self, client: TestClient) -> None:
        """DELETE answers 204 and the subscription is no longer listed; a second DELETE is 404."""
        kept = subscribe(client, "https://example.com/kept")
        removed = subscribe(client, "https://example.com/removed")
        response = client.delete(f"/webhooks/{removed['id']}")
        assert response.status_code == 204
        assert [w["id"] for w in client.get("/webhooks").json()["data"]] == [kept["id"]]
        assert_problem(client.delete(f"/webhooks/{removed['id']}"), 404, "not-found")

    def test_removing_an_unknown_subscription_is_a_404_problem(self, client: TestClient) -> None:
        """An id that names no subscription answers a problem, not a 500."""
        assert_problem(client.delete("/webhooks/00000000-0000-0000-0000-000000000000"), 404)
        assert_problem(client.delete("/webhooks/not%00an-id"), 422, "invalid-request")

    @pytest.mark.parametrize(
        "url",
        [
            "ftp://example.com/hooks",
            "example.com/hooks",
            "javascript:alert(1)",
            "https://",
            "",
            "https://example.com/" + "a" * 2100,
        ],
    )
    def test_a_url_that_is_not_http_is_refused(self, client: TestClient, url: str) -> None:
        """Only http(s) URLs of bounded length are accepted."""
        response = client.post("/webhooks", json={"url": url})
        assert_problem(response, 422, "invalid-request")
        assert client.get("/webhooks").json()["data"] == []

    @pytest.mark.parametrize("event_types", [["OrderTeleported"], ["orderplaced"], [""], [1]])
    def test_an_unknown_event_type_is_refused(
        self, client: TestClient, event_types: list[Any]
    ) -> None:
        """Event types must be names the ledger records, or "*"."""
        response = client.post(
            "/webhooks", json={"url": "https://example.com/h", "event_types": event_types}
        )
        assert_problem(response, 422, "invalid-request")
        assert client.get("/webhooks").json()["data"] == []


class TestDeliveries:
    def test_placing_an_order_delivers_a_signed_webhook(
        self, client: TestClient, receiver: WebhookReceiver
    ) -> None:
        """The receiver gets the OrderPlaced event, signed with the subscription's secret."""
        created = subscribe(client, receiver.url)
        order_id = place_order(client)
        wait_for(lambda: len(receiver.received()) == 1, "the webhook")
        [request] = receiver.received()
        headers, body = request.headers, request.body
        verify(created["secret"], headers, body)
        document = json.loads(body)
        assert document["type"] == "OrderPlaced"
        assert document["order_id"] == order_id
        assert document["id"] == headers["webhook-id"]

        wait_for(lambda: count(client, "delivered") == 1, "the effect to be marked delivered")
        [listed] = client.get("/effects").json()["data"]
        assert listed["id"] == document["id"]
        assert listed["effect"] == f"webhook:{created['id']}"
        assert listed["order_id"] == order_id
        assert listed["status"] == "delivered"
        detail = client.get(f"/effects/{listed['id']}").json()
        assert [(a["outcome"], a["status_code"]) for a in detail["history"]] == [("delivered", 204)]
        assert detail["history"][0]["started_at"]

    def test_a_webhook_names_its_event_and_the_commands_correlation(
        self, client: TestClient, receiver: WebhookReceiver
    ) -> None:
        """The receiver can trace a delivery to the event and the conversation behind it."""
        subscribe(client, receiver.url)
        placed = client.post(
            "/orders", json=order_body(), headers={"Correlation-Id": "checkout-42"}
        )
        assert placed.status_code == 201, placed.text
        wait_for(lambda: len(receiver.received()) == 1, "the webhook")
        [request] = receiver.received()
        history = client.get(f"/orders/{placed.json()['order_id']}/history").json()
        [event] = history["events"]
        assert request.headers["correlation-id"] == "checkout-42"
        assert request.headers["orderledger-event-id"] == event["metadata"]["event_id"]

    def test_a_subscription_receives_only_the_event_types_it_asked_for(
        self, client: TestClient, receiver: WebhookReceiver
    ) -> None:
        """A subscription to payments hears nothing of the placement, only the capture."""
        subscribe(client, receiver.url, ["PaymentCaptured"])
        order_id = place_order(client)
        paid = client.post(
            f"/orders/{order_id}/payments", json={"amount": 3000, "payment_reference": "pay-1"}
        )
        assert paid.status_code == 200, paid.text
        wait_for(lambda: count(client, "delivered") == 1, "the capture's webhook")
        assert [r.document["type"] for r in receiver.received()] == ["PaymentCaptured"]

    def test_a_removed_subscription_gets_nothing_new(
        self, client: TestClient, receiver: WebhookReceiver
    ) -> None:
        """Events recorded after the removal record no delivery for it."""
        kept = subscribe(client, receiver.url + "?kept")
        removed = subscribe(client, receiver.url + "?removed")
        assert client.delete(f"/webhooks/{removed['id']}").status_code == 204
        place_order(client)
        wait_for(lambda: count(client, "delivered") == 1, "the kept subscription's webhook")
        assert [e["effect"] for e in client.get("/effects").json()["data"]] == [
            f"webhook:{kept['id']}"
        ]


class TestEffectQueries:
    def test_an_unknown_effect_is_a_404_problem(self, client: TestClient) -> None:
        """Reading or retrying an effect nobody recorded answers 404."""
        unknown = "00000000-0000-0000-0000-000000000000"
        assert_problem(client.get(f"/effects/{unknown}"), 404, "not-found")
        assert_problem(client.post(f"/effects/{unknown}/retry"), 404, "not-found")

    @pytest.mark.parametrize(
        "query", [{"status": "lost"}, {"limit": 0}, {"limit": 1001}, {"limit": "many"}]
    )
    def test_odd_queries_are_422_problems(self, client: TestClient, query: dict[str, Any]) -> None:
        """A status that does not exist or a limit out of range is refused."""
        assert_problem(client.get("/effects", params=query), 422, "invalid-request")

    def test_the_limit_caps_the_list_in_position_order(
        self, client: TestClient, receiver: WebhookReceiver
    ) -> None:
        """limit=2 of three effects gives the two earliest."""
        subscribe(client, receiver.url)
        for _ in range(3):
            place_order(client)
        wait_for(lambda: count(client, "delivered") == 3, "three deliveries")
        every = client.get("/effects").json()["data"]
        first_two = client.get("/effects", params={"limit": 2}).json()["data"]
        assert [e["position"] for e in every] == sorted(e["position"] for e in every)
        assert first_two == every[:2]


class TestDeadEffectsAndReadiness:
    def test_a_healthy_instance_is_ready(self, client: TestClient) -> None:
        """Store and read models answering: 200, saying ready and nothing more."""
        response = client.get("/readyz")
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "ready"}

    def test_dead_effects_are_an_alert_not_a_reason_to_stop_serving(
        self, client: TestClient, receiver: WebhookReceiver
    ) -> None:
        """A receiver answering 500 kills the effects: /readyz stays 200 (one refused email
        must not take every API machine out), the effects list and metrics show them; after
        a fix, a retry delivers them."""
        receiver.status = 500
        subscribe(client, receiver.url)
        first, second = place_order(client), place_order(client)

        # Each effect is tried twice (effect_max_attempts=2), then it is dead.
        wait_for(lambda: count(client, "dead") == 2, "both effects to go dead")
        dead = client.get("/effects", params={"status": "dead"}).json()["data"]
        assert sorted(e["order_id"] for e in dead) == sorted([first, second])
        assert all(e["last_error"] == "HTTP 500" for e in dead)
        detail = client.get(f"/effects/{dead[0]['id']}").json()
        assert [(a["outcome"], a["status_code"]) for a in detail["history"]] == [
            ("failed", 500),
            ("dead", 500),
        ]

        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics").text
        assert 'orderledger_outbox_effects{status="dead"} 2.0' in metrics

        # The receiver is fixed; retrying one effect still leaves the other dead.
        receiver.status = 204
        retried = client.post(f"/effects/{dead[0]['id']}/retry")
        assert retried.status_code == 200, retried.text
        assert retried.json()["attempts"] == 0
        assert len(retried.json()["history"]) == 2  # the history is kept
        wait_for(lambda: count(client, "delivered") == 1, "the retried effect's delivery")
        assert count(client, "dead") == 1

        # Retrying something that is not dead is a conflict.
        assert_problem(client.post(f"/effects/{dead[0]['id']}/retry"), 409, "conflict")

        assert client.post(f"/effects/{dead[1]['id']}/retry").status_code == 200
        wait_for(lambda: count(client, "delivered") == 2, "the second delivery")
        assert count(client, "dead") == 0
        delivered = [r.webhook_id for r in receiver.received()][-2:]
        assert sorted(delivered) == sorted(e["id"] for e in dead)


class TestWebhookTargets:
    """Webhooks reach public addresses, and local or private ones only when allowed."""

    @pytest.mark.parametrize(
        "url",
        [
            "http://127.0.0.1:9000/hooks",
            "http://[::1]:9000/hooks",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.7/hooks",
        ],
    )
    def test_a_subscription_to_a_local_literal_is_refused_naming_the_setting(
        self, sqlite_url: str, url: str
    ) -> None:
        """A 422 that says how to allow it; nothing is subscribed."""
        settings = fast_settings(sqlite_url, webhook_allowed_networks="")
        with TestClient(create_app(settings), headers=admin(sqlite_url)) as strict:
            problem = assert_problem(strict.post("/webhooks", json={"url": url}), 422)
            assert "ORDERLEDGER_WEBHOOK_ALLOWED_NETWORKS" in problem["detail"]
            assert strict.get("/webhooks").json()["data"] == []

    def test_a_name_that_resolves_to_loopback_is_refused_when_sent(
        self, sqlite_url: str, receiver: WebhookReceiver
    ) -> None:
        """The name passes at subscription; each attempt resolves it, and refuses to connect,
        saying only that the address is not allowed."""
        settings = fast_settings(sqlite_url, webhook_allowed_networks="")
        local_name = receiver.url.replace("127.0.0.1", "localhost")
        with TestClient(create_app(settings), headers=admin(sqlite_url)) as strict:
            subscribe(strict, local_name)
            place_order(strict)
            wait_for(lambda: count(strict, "dead") == 1, "the webhook to go dead")
            (dead,) = strict.get("/effects", params={"status": "dead"}).json()["data"]
            assert dead["last_error"] == "address not allowed"
            detail = strict.get(f"/effects/{dead['id']}").json()
            assert {a["error"] for a in detail["history"]} == {"address not allowed"}
        assert receiver.received() == []

    def test_an_allowed_network_is_reached_by_name(
        self, client: TestClient, receiver: WebhookReceiver
    ) -> None:
        """Connected to the checked address; the name stays in the Host header."""
        local_name = receiver.url.replace("127.0.0.1", "localhost")
        subscribe(client, local_name)
        place_order(client)
        wait_for(lambda: count(client, "delivered") == 1, "the delivery")
        (request,) = receiver.received()
        headers = request.headers
        assert headers["host"] == local_name.split("/")[2]

    def test_a_refused_connection_is_shown_as_its_class_not_socket_text(
        self, client: TestClient
    ) -> None:
        """The attempt error says what kind of failure happened, nothing of the socket."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        subscribe(client, f"http://127.0.0.1:{port}/hooks")
        place_order(client)
        wait_for(lambda: count(client, "dead") == 1, "the webhook to go dead")
        (dead,) = client.get("/effects", params={"status": "dead"}).json()["data"]
        assert dead["last_error"] == "connection failed"


class TestPeriodicReconcile:
    def test_the_served_app_restores_lost_outbox_rows_on_its_own(
        self, sqlite_url: str, receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With a short interval, the lifespan's reconciler records a deleted row again."""
        caplog.set_level(logging.INFO, logger="orderledger.effects")
        settings = fast_settings(sqlite_url, effect_reconcile_interval=0.2)
        with TestClient(create_app(settings), headers=admin(sqlite_url)) as client:
            subscribe(client, receiver.url)
            place_order(client)
            wait_for(lambda: count(client, "delivered") == 1, "the first delivery")
            [lost] = client.get("/effects").json()["data"]
            wait_for(lambda: "reconcile pass recorded 0 effect(s)" in caplog.text, "a healthy pass")
            delete_outbox_rows(sqlite_url, [lost["id"]])
            wait_for(
                lambda: "reconcile pass recorded 1 effect(s)" in caplog.text, "the restoring pass"
            )
            # Restored as pending, it goes out again under the same id: receivers deduplicate.
            wait_for(lambda: len(receiver.received()) == 2, "the second delivery")
            assert [r.webhook_id for r in receiver.received()] == [lost["id"]] * 2


class TestOnEveryStore:
    def test_deliveries_dead_letters_and_retries_work(
        self, store_url: str, receiver: WebhookReceiver
    ) -> None:
        """Subscribe, deliver, kill, retry, deliver: on SQLite and PostgreSQL."""
        with TestClient(create_app(fast_settings(store_url)), headers=admin(store_url)) as client:
            created = subscribe(client, receiver.url)
            place_order(client)
            wait_for(lambda: count(client, "delivered") == 1, "the first delivery")
            first = receiver.received()[0]
            verify(created["secret"], first.headers, first.body)

            receiver.status = 500
            place_order(client)
            wait_for(lambda: count(client, "dead") == 1, "a dead effect")

            receiver.status = 204
            [dead] = client.get("/effects", params={"status": "dead"}).json()["data"]
            assert client.post(f"/effects/{dead['id']}/retry").status_code == 200
            wait_for(lambda: count(client, "delivered") == 2, "the retried delivery")
            assert client.delete(f"/webhooks/{created['id']}").status_code == 204
            assert client.get("/webhooks").json()["data"] == []


class TestOpenApi:
    def test_each_route_names_its_model_and_problems(self, client: TestClient) -> None:
        """The schema documents each side-effect route's response model and problem statuses."""
        paths = client.get("/openapi.json").json()["paths"]
        expected = {
            ("/webhooks", "post"): ("201", "WebhookCreated", ["422"]),
            ("/webhooks", "get"): ("200", "WebhooksPublic", []),
            ("/webhooks/{subscription_id}", "delete"): ("204", None, ["404", "422"]),
            ("/effects", "get"): ("200", "EffectsPublic", ["422"]),
            ("/effects/{effect_id}", "get"): ("200", "EffectDetailPublic", ["404", "422"]),
            ("/effects/{effect_id}/retry", "post"): (
                "200",
                "EffectDetailPublic",
                ["404", "409", "422"],
            ),
            ("/readyz", "get"): ("200", "Readiness", []),
        }
        for (path, method), (success, model, problems) in expected.items():
            operation = paths[path][method]
            assert operation["description"], (path, method)
            responses = operation["responses"]
            if model is not None:
                schema = responses[success]["content"]["application/json"]["schema"]
                assert schema["$ref"].endswith(f"/{model}"), (path, method)
            for status in problems:
                assert "application/problem+json" in responses[status]["content"], (path, status)
        not_ready = paths["/readyz"]["get"]["responses"]["503"]["content"]["application/json"]
        assert not_ready["schema"]["$ref"].endswith("/Readiness")
