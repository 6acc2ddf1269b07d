"""Idempotency-Key over HTTP: every write may be retried, and a retry never acts twice.

Order commands keep their keys in the event store; other writes (webhooks, effect retries,
rebuilds) in the http_idempotency table. Either way a repeat gets the first status, headers and
body back, a different request under the same key is refused, and keys never cross API keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.http.app import create_app
from api.http.idempotency import (
    ABANDONED_AFTER,
    Claim,
    HttpIdempotencyStore,
    StillRunningError,
    StoredResponse,
)
from api.key_store import Role
from api.settings import Settings
from tests import LOCAL_RECEIVERS
from tests.support.auth import bearer, issue_key
from tests.support.http import assert_problem, head_position, history_length, order_body

WEBHOOK = {"url": "http://127.0.0.1:9/hook", "event_types": ["OrderPlaced"]}


def placed_events(client: TestClient) -> int:
    """How many OrderPlaced events the store holds, read from the store itself."""
    ledger = client.app.state.ledger  # type: ignore[attr-defined]
    notifications = ledger.recorder.select_notifications(start=1, limit=100_000)
    return sum(1 for n in notifications if n.topic.endswith("Order.Placed"))


def keyed(key: str, **headers: str) -> dict[str, str]:
    return {"Idempotency-Key": key, **headers}


def same_answer(first: httpx.Response, second: httpx.Response) -> None:
    """The second response repeats the first: status, body and the headers that matter."""
    assert second.status_code == first.status_code
    assert second.json() == first.json()
    for name in ("Location", "ETag", "Orderledger-Position"):
        assert second.headers.get(name) == first.headers.get(name)
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers["Idempotent-Replayed"] == "true"


class TestOrderCommands:
    def test_a_repeated_placement_returns_the_first_201_and_location(
        self, client: TestClient
    ) -> None:
        first = client.post("/orders", json=order_body(), headers=keyed("place-1"))
        assert first.status_code == 201
        head = head_position(client)
        second = client.post("/orders", json=order_body(), headers=keyed("place-1"))
        same_answer(first, second)
        assert second.headers["Location"] == f"/orders/{first.json()['order_id']}"
        assert head_position(client) == head
        assert placed_events(client) == 1

    def test_key_order_in_the_body_does_not_make_a_different_request(
        self, client: TestClient
    ) -> None:
        body = order_body()
        first = client.post("/orders", json=body, headers=keyed("place-2"))
        reordered = dict(reversed(list(body.items())))
        second = client.post("/orders", json=reordered, headers=keyed("place-2"))
        same_answer(first, second)

    def test_the_same_key_with_another_body_is_refused_and_records_nothing(
        self, client: TestClient
    ) -> None:
        client.post("/orders", json=order_body(), headers=keyed("place-3"))
        head = head_position(client)
        other = client.post(
            "/orders", json=order_body(customer_id="cust-other"), headers=keyed("place-3")
        )
        problem = assert_problem(other, 422)
        assert "already used" in problem["detail"]
        assert head_position(client) == head

    def test_the_same_key_from_two_api_keys_is_two_requests(
        self, client: TestClient, auth_headers: Callable[[Role], dict[str, str]]
    ) -> None:
        writer = auth_headers(Role.writer)
        mine = client.post("/orders", json=order_body(), headers=keyed("shared"))
        theirs = client.post("/orders", json=order_body(), headers=keyed("shared", **writer))
        assert mine.status_code == theirs.status_code == 201
        assert mine.json()["order_id"] != theirs.json()["order_id"]
        assert "Idempotent-Replayed" not in theirs.headers
        # A different body under the same key is each caller's own business.
        changed = client.post(
            "/orders", json=order_body(customer_id="c-9"), headers=keyed("shared", **writer)
        )
        assert_problem(changed, 422)
        assert placed_events(client) == 2

    @pytest.mark.parametrize(
        ("method", "suffix", "body"),
        [
            ("POST", "/lines", {"sku": "SKU-9", "quantity": 1, "unit_price": 10}),
            ("DELETE", "/lines/SKU-2", None),
            ("POST", "/payments", {"amount": 100, "payment_reference": "psp-1"}),
            ("POST", "/cancellation", {"reason": "changed mind"}),
        ],
    )
    def test_a_repeated_command_returns_the_first_result_without_a_new_event(
        self,
        client: TestClient,
        place_order: Callable[..., str],
        method: str,
        suffix: str,
        body: dict[str, Any] | None,
    ) -> None:
        order_id = place_order()
        url = f"/orders/{order_id}{suffix}"
        first = client.request(method, url, json=body, headers=keyed("cmd-1"))
        assert first.status_code == 200, first.text
        second = client.request(method, url, json=body, headers=keyed("cmd-1"))
        same_answer(first, second)
        assert history_length(client, order_id) == 2

    def test_twenty_concurrent_placements_with_one_key_make_one_order(
        self, store_client: TestClient
    ) -> None:
        body = order_body()

        def place(_: int) -> httpx.Response:
            return store_client.post("/orders", json=body, headers=keyed("burst"))

        with ThreadPoolExecutor(max_workers=20) as pool:
            responses = list(pool.map(place, range(20)))
        assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses]
        assert len({r.text for r in responses}) == 1
        assert len({r.headers["Location"] for r in responses}) == 1
        assert sum("Idempotent-Replayed" not in r.headers for r in responses) == 1
        assert placed_events(store_client) == 1

    @pytest.mark.parametrize("key", ["", "k" * 201, "has space", "tab\there"])
    def test_a_malformed_key_is_refused_before_anything_is_done(
        self, client: TestClient, key: str
    ) -> None:
        before = head_position(client)
        response = client.post("/orders", json=order_body(), headers={"Idempotency-Key": key})
        problem = assert_problem(response, 422, "invalid-command")
        assert "idempotency key" in problem["detail"]
        assert head_position(client) == before


def webhook_ids(client: TestClient) -> list[str]:
    response = client.get("/webhooks")
    assert response.status_code == 200, response.text
    return [hook["id"] for hook in response.json()["data"]]


class TestOtherWrites:
    def test_a_repeated_webhook_subscription_subscribes_once_and_never_shows_the_secret_again(
        self, client: TestClient
    ) -> None:
        """The secret exists in the first response only: a retry is told which subscription
        it made, and the stored answer holds no secret."""
        first = client.post("/webhooks", json=WEBHOOK, headers=keyed("hook-1"))
        assert first.status_code == 201, first.text
        secret = first.json()["secret"]
        second = client.post("/webhooks", json=WEBHOOK, headers=keyed("hook-1"))
        problem = assert_problem(second, 409, "webhook-already-created")
        assert first.json()["id"] in problem["detail"]
        assert second.headers["Idempotent-Replayed"] == "true"
        assert secret not in second.text
        assert webhook_ids(client) == [first.json()["id"]]
        stored = client.app.state.http_idempotency  # type: ignore[attr-defined]
        with stored.engine.connect() as conn:
            bodies = conn.exec_driver_sql("SELECT body FROM http_idempotency").scalars().all()
        assert bodies and not any(secret.encode() in stored_body for stored_body in bodies)

    def test_without_a_key_each_post_subscribes_again(self, client: TestClient) -> None:
        client.post("/webhooks", json=WEBHOOK)
        client.post("/webhooks", json=WEBHOOK)
        assert len(webhook_ids(client)) == 2

    def test_another_body_under_the_same_key_is_refused(self, client: TestClient) -> None:
        client.post("/webhooks", json=WEBHOOK, headers=keyed("hook-2"))
        other = {**WEBHOOK, "url": "http://127.0.0.1:9/other"}
        response = client.post("/webhooks", json=other, headers=keyed("hook-2"))
        problem = assert_problem(response, 422, "invalid-request")
        assert problem["errors"][0]["field"] == "header.Idempotency-Key"
        assert len(webhook_ids(client)) == 1

    def test_a_refused_request_leaves_its_key_free(self, client: TestClient) -> None:
        """Nothing was done, so the key may carry the corrected request."""
        bad = {**WEBHOOK, "url": "ftp://example.com/hook"}
        refused = client.post("/webhooks", json=bad, headers=keyed("hook-3"))
        assert_problem(refused, 422)
        accepted = client.post("/webhooks", json=WEBHOOK, headers=keyed("hook-3"))
        assert accepted.status_code == 201, accepted.text
        assert "Idempotent-Replayed" not in accepted.headers

    def test_keys_never_cross_api_keys(
        self, client: TestClient, auth_headers: Callable[[Role], dict[str, str]]
    ) -> None:
        other_admin = auth_headers(Role.admin)
        mine = client.post("/webhooks", json=WEBHOOK, headers=keyed("hook-4"))
        theirs = client.post("/webhooks", json=WEBHOOK, headers=keyed("hook-4", **other_admin))
        assert mine.status_code == theirs.status_code == 201
        assert mine.json()["id"] != theirs.json()["id"]
        assert "Idempotent-Replayed" not in theirs.headers

    def test_concurrent_subscriptions_with_one_key_subscribe_once(
        self, store_client: TestClient
    ) -> None:
        def subscribe(_: int) -> httpx.Response:
            return store_client.post("/webhooks", json=WEBHOOK, headers=keyed("hook-burst"))

        with ThreadPoolExecutor(max_workers=10) as pool:
            responses = list(pool.map(subscribe, range(10)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [201] + [409] * 9, [r.text for r in responses]
        assert len(webhook_ids(store_client)) == 1

    def test_a_repeated_rebuild_request_returns_the_first_answer(self, client: TestClient) -> None:
        url = "/projections/order_summaries/rebuild"
        first = client.post(url, headers=keyed("rebuild-1"))
        assert first.status_code == 202, first.text
        second = client.post(url, headers=keyed("rebuild-1"))
        same_answer(first, second)
        restart = client.post(f"{url}?restart=true", headers=keyed("rebuild-1"))
        assert_problem(restart, 422, "invalid-request")

    def test_a_repeated_key_creation_issues_no_second_key_and_never_shows_the_token_again(
        self, client: TestClient
    ) -> None:
        """The token exists in the first response only: a retry is told which key it made."""
        before = len(client.get("/keys").json()["data"])
        body = {"role": "reader", "name": "dashboard"}
        first = client.post("/keys", json=body, headers=keyed("key-1"))
        assert first.status_code == 201, first.text
        token = first.json()["token"]
        second = client.post("/keys", json=body, headers=keyed("key-1"))
        problem = assert_problem(second, 409, "key-already-issued")
        assert first.json()["key_id"] in problem["detail"]
        assert second.headers["Idempotent-Replayed"] == "true"
        assert token not in second.text
        assert len(client.get("/keys").json()["data"]) == before + 1
        stored = client.app.state.http_idempotency  # type: ignore[attr-defined]
        with stored.engine.connect() as conn:
            bodies = conn.exec_driver_sql("SELECT body FROM http_idempotency").scalars().all()
        assert bodies and not any(token.encode() in stored_body for stored_body in bodies)

    def test_a_delete_with_a_key_replays_its_204(self, client: TestClient) -> None:
        hook_id = client.post("/webhooks", json=WEBHOOK).json()["id"]
        first = client.delete(f"/webhooks/{hook_id}", headers=keyed("unhook"))
        assert first.status_code == 204
        second = client.delete(f"/webhooks/{hook_id}", headers=keyed("unhook"))
        assert second.status_code == 204
        assert second.headers["Idempotent-Replayed"] == "true"
        # Without the key the repeat is a fresh request, and there is nothing left to delete.
        assert_problem(client.delete(f"/webhooks/{hook_id}"), 404)


@pytest.fixture
def failing_deliveries(sqlite_url: str) -> Iterator[TestClient]:
    """The app with effects that die at their first failed attempt."""
    settings = Settings(
        database_url=sqlite_url,
        webhook_allowed_networks=LOCAL_RECEIVERS,
        effect_max_attempts=1,
        effect_backoff_base=0.01,
        effect_backoff_cap=0.05,
        projection_idle_wait=0.05,
        projection_poll_interval=0.01,
    )
    headers = bearer(issue_key(sqlite_url, Role.admin))
    with TestClient(create_app(settings), headers=headers) as client:
        yield client


def dead_effect(client: TestClient) -> str:
    """Subscribe a port nothing listens on, place an order, wait for its webhook to die."""
    client.post("/webhooks", json=WEBHOOK)
    client.post("/orders", json=order_body())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        dead = client.get("/effects", params={"status": "dead"}).json()["data"]
        webhooks = [effect["id"] for effect in dead if effect["kind"] == "webhook"]
        if webhooks:
            return str(webhooks[0])
        time.sleep(0.05)
    pytest.fail("the webhook effect never went dead")


def test_a_repeated_effect_retry_returns_the_first_answer(
    failing_deliveries: TestClient,
) -> None:
    """Without the key a second retry of a live effect would be a 409; with it, a replay."""
    effect_id = dead_effect(failing_deliveries)
    url = f"/effects/{effect_id}/retry"
    first = failing_deliveries.post(url, headers=keyed("retry-1"))
    assert first.status_code == 200, first.text
    second = failing_deliveries.post(url, headers=keyed("retry-1"))
    same_answer(first, second)
    history = failing_deliveries.get(f"/effects/{effect_id}").json()["history"]
    # One retry's worth of attempts at most: the replay sent nothing again.
    assert len(history) <= 2


class TestTheResponseStore:
    """The http_idempotency table itself, on the app's real read-model database."""

    @pytest.fixture
    def store(self, store_client: TestClient) -> HttpIdempotencyStore:
        engine = store_client.app.state.projections.engine  # type: ignore[attr-defined]
        return HttpIdempotencyStore(engine, ttl=3600)

    def test_a_claim_blocks_a_duplicate_until_abandoned(self, store: HttpIdempotencyStore) -> None:
        claim = Claim(scope="k1", key="a", fingerprint="f")
        assert store.claim(claim, now=1000.0) is None
        with pytest.raises(StillRunningError):
            store.claim(claim, now=1000.0 + ABANDONED_AFTER - 1)
        # The first request died: a retry takes the claim over.
        assert store.claim(claim, now=1000.0 + ABANDONED_AFTER + 1) is None

    def test_a_stored_response_expires_after_its_ttl(self, store: HttpIdempotencyStore) -> None:
        claim = Claim(scope="k1", key="b", fingerprint="f")
        assert store.claim(claim, now=1000.0) is None
        store.complete(claim, StoredResponse(201, b"{}", {"location": "/x"}))
        replay = store.claim(claim, now=1000.0 + 3599)
        assert replay == StoredResponse(201, b"{}", {"location": "/x"})
        assert store.claim(claim, now=1000.0 + 3601) is None
