"""GET /metrics through the ASGI app: commands, requests, projections and effects as counted."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.http.app import create_app
from api.key_store import Role
from api.metrics import UNMATCHED_ROUTE
from api.settings import Settings
from tests import LOCAL_RECEIVERS
from tests.support.auth import bearer, issue_key
from tests.support.http import order_body
from tests.support.waiting import wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: TestClient) -> Samples:
    """Every sample of /metrics, keyed by name and labels."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when it is absent, as an untouched counter is)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def growth(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def place(client: TestClient, **headers: str) -> dict[str, Any]:
    response = client.post("/orders", json=order_body(), headers=headers)
    assert response.status_code in (200, 201), response.text
    body: dict[str, Any] = response.json()
    return body


def refused_url() -> str:
    """A loopback URL nothing listens on: every delivery attempt fails at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/hooks"


class TestCommandMetrics:
    def test_commands_are_counted_by_type_and_outcome(self, client: TestClient) -> None:
        """ok, replayed, conflict (If-Match 412), rejected (422 and 409) and not_found move."""
        before = scrape(client)
        order_id = place(client)["order_id"]
        place(client, **{"Idempotency-Key": "metrics-1"})
        place(client, **{"Idempotency-Key": "metrics-1"})  # the same body again: replayed

        stale = client.post(
            f"/orders/{order_id}/payments",
            json={"amount": 100, "payment_reference": "p-1"},
            headers={"If-Match": '"7"'},
        )
        assert stale.status_code == 412, stale.text
        reused = client.post(
            "/orders",
            json=order_body(customer_id="other"),
            headers={"Idempotency-Key": "metrics-1"},
        )
        assert reused.status_code == 422, reused.text
        too_much = client.post(
            f"/orders/{order_id}/payments", json={"amount": 10**9, "payment_reference": "p-2"}
        )
        assert too_much.status_code == 409, too_much.text
        missing = client.post(
            f"/orders/{uuid.uuid4()}/payments", json={"amount": 1, "payment_reference": "p-3"}
        )
        assert missing.status_code == 404, missing.text
        after = scrape(client)

        counted = "orderledger_commands_total"
        assert growth(before, after, counted, command="place_order", outcome="ok") == 2
        assert growth(before, after, counted, command="place_order", outcome="replayed") == 1
        assert growth(before, after, counted, command="place_order", outcome="rejected") == 1
        payment = {"command": "capture_payment"}
        assert growth(before, after, counted, **payment, outcome="conflict") == 1
        assert growth(before, after, counted, **payment, outcome="rejected") == 1
        assert growth(before, after, counted, **payment, outcome="not_found") == 1
        assert growth(before, after, counted, **payment, outcome="ok") == 0
        timed = "orderledger_command_duration_seconds_count"
        assert growth(before, after, timed, command="place_order") == 4
        assert growth(before, after, timed, **payment) == 3

    def test_commands_outside_http_count_too(self, client: TestClient) -> None:
        """The count hangs on the ledger, so a command sent straight to it is counted alike."""
        before = scrape(client)
        ledger = client.app.state.ledger  # type: ignore[attr-defined]
        ledger.place_order(**order_body())
        after = scrape(client)
        assert (
            growth(before, after, "orderledger_commands_total", command="place_order", outcome="ok")
            == 1
        )


class TestHttpMetrics:
    def test_requests_are_labelled_by_route_template_method_and_status(
        self, client: TestClient
    ) -> None:
        """Two order ids share one label; unmatched paths share one; raw paths never appear."""
        before = scrape(client)
        first, second = uuid.uuid4(), uuid.uuid4()
        for order_id in (first, second):
            assert client.get(f"/orders/{order_id}/history").status_code == 404
        stray = f"/no-such-route/{uuid.uuid4().hex}"
        assert client.get(stray).status_code == 404
        response = client.get("/metrics")
        after = scrape(client)

        requests = "orderledger_http_requests_total"
        history = {"route": "/orders/{order_id}/history", "method": "GET"}
        assert growth(before, after, requests, **history, status="404") == 2
        assert (
            growth(before, after, requests, route=UNMATCHED_ROUTE, method="GET", status="404") == 1
        )
        assert growth(before, after, requests, route="/metrics", method="GET", status="200") == 2
        assert (
            growth(before, after, "orderledger_http_request_duration_seconds_count", **history) == 2
        )
        for raw in (str(first), str(second), stray):
            assert raw not in response.text

    def test_unknown_methods_share_one_label(self, client: TestClient) -> None:
        """A made-up method name is counted under `other`, never as a label of its own."""
        before = scrape(client)
        assert client.request("BREW", "/orders").status_code == 405
        after = scrape(client)
        requests = "orderledger_http_requests_total"
        assert growth(before, after, requests, route="/orders", method="other", status="405") == 1
        assert not [key for key in after if ("method", "BREW") in key[1]]

    def test_many_apps_in_one_process_share_the_counters(self, sqlite_url: str) -> None:
        """A second app neither fails to register its metrics nor starts its counts from zero."""
        headers = bearer(issue_key(sqlite_url, Role.admin))
        with TestClient(create_app(Settings(database_url=sqlite_url)), headers=headers) as one:
            place(one)
            counted = scrape(one)
        with TestClient(create_app(Settings(database_url=sqlite_url)), headers=headers) as two:
            place(two)
            later = scrape(two)
        name = "orderledger_commands_total"
        assert growth(counted, later, name, command="place_order", outcome="ok") == 1


class TestProjectionMetrics:
    @pytest.fixture
    def idle_client(self, sqlite_url: str) -> Iterator[TestClient]:
        """An app that runs no projection worker, so what it reads stays behind."""
        settings = Settings(database_url=sqlite_url, run_projections=False)
        headers = bearer(issue_key(sqlite_url, Role.admin))
        with TestClient(create_app(settings), headers=headers) as client:
            yield client

    def test_lag_gauges_match_the_projections_endpoint(self, idle_client: TestClient) -> None:
        """Position, head, lag and state per projection are what /projections reports."""
        for _ in range(3):
            place(idle_client)
        projections = idle_client.get("/projections").json()["data"]
        samples = scrape(idle_client)

        assert projections
        for projection in projections:
            name = {"projection": projection["name"]}
            assert projection["head"] >= 3
            assert value(samples, "orderledger_projection_head", **name) == projection["head"]
            for field in ("position", "lag_events"):
                gauge = f"orderledger_projection_{field}"
                assert value(samples, gauge, **name) == projection[field], field
            assert value(samples, "orderledger_projection_lag_events", **name) > 0
            state = projection["state"]
            assert value(samples, "orderledger_projection_state", **name, state=state) == 1
            others = [key for key in samples if key[0] == "orderledger_projection_state"]
            lit = [k for k in others if ("projection", projection["name"]) in k[1]]
            assert sum(samples[k] for k in lit) == 1
        assert value(samples, "orderledger_store_up") == 1

    def test_a_running_worker_brings_the_lag_to_zero(self, client: TestClient) -> None:
        """With the embedded worker the gauges reach the head once it has caught up."""
        head = place(client)["position"]

        def caught_up() -> bool:
            projections = client.get("/projections").json()["data"]
            return all(p["position"] >= head for p in projections)

        wait_for(caught_up, "the projections to catch up", timeout=20.0)
        time.sleep(1.1)  # past the scrape cache
        samples = scrape(client)
        names = [p["name"] for p in client.get("/projections").json()["data"]]
        for name in names:
            assert value(samples, "orderledger_projection_lag_events", projection=name) == 0
            assert value(samples, "orderledger_projection_position", projection=name) >= head
            assert (
                value(samples, "orderledger_projection_state", projection=name, state="live") == 1
            )


class TestStoreOutage:
    @pytest.mark.postgres
    def test_a_scrape_still_answers_when_the_store_is_gone(self, postgres_url: str) -> None:
        """The database dropped under a running app: /metrics is 200 with store_up at 0."""
        settings = Settings(database_url=postgres_url, metrics_public=True, run_projections=False)
        with TestClient(create_app(settings)) as client:
            assert value(scrape(client), "orderledger_store_up") == 1
            admin, database = postgres_url.rsplit("/", 1)
            with psycopg.connect(f"{admin}/postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
            time.sleep(1.1)  # past the scrape cache
            samples = scrape(client)
        assert value(samples, "orderledger_store_up") == 0
        assert not [key for key in samples if key[0].startswith("orderledger_projection_")]


class TestEffectMetrics:
    def test_a_dead_effect_shows_in_the_outbox_gauge_and_the_attempt_counters(
        self, sqlite_url: str
    ) -> None:
        """A webhook to a refused port dies after one attempt: dead 1, one dead attempt counted."""
        settings = Settings(
            database_url=sqlite_url,
            webhook_allowed_networks=LOCAL_RECEIVERS,
            effect_max_attempts=1,
            projection_idle_wait=0.05,
            projection_poll_interval=0.01,
        )
        headers = bearer(issue_key(sqlite_url, Role.admin))
        with TestClient(create_app(settings), headers=headers) as client:
            before = scrape(client)
            created = client.post("/webhooks", json={"url": refused_url()})
            assert created.status_code == 201, created.text
            place(client)

            def dead() -> bool:
                response = client.get("/effects", params={"status": "dead"})
                return len(response.json()["data"]) == 1

            wait_for(dead, "the effect to go dead", timeout=20.0)
            time.sleep(1.1)  # past the scrape cache
            after = scrape(client)

        assert value(after, "orderledger_outbox_effects", status="dead") == 1
        assert value(after, "orderledger_outbox_effects", status="pending") == 0
        assert value(after, "orderledger_outbox_effects", status="delivered") == 0
        attempts = "orderledger_effect_attempts_total"
        assert growth(before, after, attempts, kind="webhook", outcome="dead") == 1
        assert growth(before, after, attempts, kind="webhook", outcome="failed") == 0
        assert growth(before, after, "orderledger_effects_dead_total", kind="webhook") == 1


class TestMetricsGuard:
    def test_only_admin_keys_may_scrape_by_default(
        self, client: TestClient, auth_headers: Callable[[Role], dict[str, str]]
    ) -> None:
        """No key: 401 with a challenge; reader and writer: 403; admin: 200."""
        anonymous = client.get("/metrics", headers={"Authorization": ""})
        assert anonymous.status_code == 401, anonymous.text
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        assert anonymous.headers["content-type"] == "application/problem+json"
        for role in (Role.reader, Role.writer):
            refused = client.get("/metrics", headers=auth_headers(role))
            assert refused.status_code == 403, (role, refused.text)
        assert client.get("/metrics", headers=auth_headers(Role.admin)).status_code == 200

    def test_metrics_public_opens_the_endpoint(self, sqlite_url: str) -> None:
        """With metrics_public a scraper needs no key; the rest of the API still does."""
        settings = Settings(database_url=sqlite_url, metrics_public=True)
        with TestClient(create_app(settings)) as client:
            response = client.get("/metrics")
            assert response.status_code == 200, response.text
            assert "orderledger_http_requests_total" in response.text
            assert client.get("/projections").status_code == 401
