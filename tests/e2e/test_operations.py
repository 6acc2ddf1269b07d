"""What an operator sees of a running server: metrics, request ids and logs, shutdown."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.http import assert_problem, order_body
from tests.support.processes import Deployment, Server
from tests.support.shop import Shop
from tests.support.waiting import wait_for


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels`` (0 when there are none)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def scrape(server: Server) -> str:
    with server.client() as http:
        response = http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


class TestObservability:
    """Counters that move, request ids that come back, one JSON log line per request."""

    def test_metrics_move_request_ids_come_back_and_every_log_line_is_json(
        self, server: Server
    ) -> None:
        """A placement and a refused condition move their counters (admins only); a sane
        X-Request-ID comes back, even on a 401, and names the request's JSON log line."""
        before = scrape(server)
        with server.client() as http:
            mine = http.post("/orders", json=order_body(), headers={"X-Request-ID": "e2e-req.1"})
            assert mine.headers["X-Request-ID"] == "e2e-req.1"
            order_id = mine.json()["order_id"]
            line = {"sku": "SKU-9", "quantity": 1, "unit_price": 10}
            stale = http.post(f"/orders/{order_id}/lines", json=line, headers={"If-Match": '"9"'})
            assert stale.status_code == 412
            generated = stale.headers["X-Request-ID"]
            assert generated
        after = scrape(server)

        def moved(name: str, **labels: str) -> float:
            return metric(after, name, **labels) - metric(before, name, **labels)

        assert moved("orderledger_commands_total", command="place_order", outcome="ok") == 1
        assert moved("orderledger_commands_total", command="add_line", outcome="conflict") == 1
        posted = {"route": "/orders", "method": "POST", "status": "201"}
        assert moved("orderledger_http_requests_total", **posted) == 1
        lines = {"route": "/orders/{order_id}/lines", "method": "POST", "status": "412"}
        assert moved("orderledger_http_requests_total", **lines) == 1
        with server.anonymous() as http:
            refused = http.get("/metrics", headers={"X-Request-ID": "e2e-req.2"})
            assert_problem(refused, 401)
            assert refused.headers["X-Request-ID"] == "e2e-req.2"

        def logged(request_id: str) -> list[dict[str, Any]]:
            return [r for r in server.log_records() if r.get("request_id") == request_id]

        (placed,) = wait_for(lambda: logged("e2e-req.1"), "the request is logged", timeout=10)
        assert (placed["method"], placed["route"], placed["status"]) == ("POST", "/orders", 201)
        assert placed["latency_ms"] >= 0
        (conflict,) = wait_for(lambda: logged(generated), "the 412 is logged", timeout=10)
        assert (conflict["route"], conflict["status"]) == ("/orders/{order_id}/lines", 412)
        (denied,) = wait_for(lambda: logged("e2e-req.2"), "the 401 is logged", timeout=10)
        assert denied["status"] == 401


class TestGracefulShutdown:
    """SIGTERM while clients are placing orders."""

    @pytest.mark.slow
    def test_every_acknowledged_order_survives_sigterm_during_a_burst(
        self, deployment: Deployment
    ) -> None:
        """Exit 0; every 201 is in the store after a restart, and no order is half there."""
        server = deployment.serve()
        acknowledged: dict[str, int] = {}
        statuses: list[int] = []
        answered_at: list[float] = []
        lock = threading.Lock()

        def client_loop() -> None:
            with server.client() as http:
                while True:
                    try:
                        response = http.post("/orders", json=order_body(customer_id="cust-burst"))
                    except httpx.TransportError:
                        return  # the server is gone: nothing more can be acknowledged
                    with lock:
                        answered_at.append(time.monotonic())
                        statuses.append(response.status_code)
                        if response.status_code == 201:
                            body = response.json()
                            acknowledged[body["order_id"]] = body["position"]

        clients = [threading.Thread(target=client_loop) for _ in range(6)]
        for client in clients:
            client.start()
        deployment.wait_for(lambda: len(acknowledged) >= 40, "40 orders are acknowledged")
        sigterm_sent = time.monotonic()
        assert server.terminate() == 0, server.output()
        for client in clients:
            client.join(60)
        assert set(statuses) == {201}, f"answers during shutdown: {sorted(set(statuses))}"
        # Requests in flight when the signal came were finished, not dropped.
        assert any(moment > sigterm_sent for moment in answered_at)

        restarted = deployment.serve("serve-again")
        with restarted.client() as http:
            shop = Shop(http)
            # Everything committed, acknowledged or not (a reply may be lost on the way).
            shop.position = int(http.get("/projections").json()["data"][0]["head"])
            assert shop.position >= max(acknowledged.values())
            stored: list[dict[str, Any]] = []
            page = shop.read("/orders", customer_id="cust-burst", limit=200)
            stored += page["data"]
            while page["next"] is not None:
                page = http.get(page["next"]).json()
                stored += page["data"]
            stored_ids = {order["order_id"] for order in stored}
            assert set(acknowledged) <= stored_ids
            for order in stored:
                assert (order["version"], order["line_count"], order["total"]) == (1, 2, 3000)
            for order_id, position in acknowledged.items():
                (event,) = http.get(f"/orders/{order_id}/history").json()["events"]
                assert (event["type"], event["position"]) == ("OrderPlaced", position)


class TestSeveralApiProcesses:
    """`serve --workers 2`, seen only through the public API."""

    @pytest.mark.slow
    @pytest.mark.postgres
    def test_two_api_processes_serve_commands_and_fresh_reads(
        self, postgres_deployment: Deployment
    ) -> None:
        """Orders placed on fresh connections are read back at their positions; /metrics sums
        both processes; SIGTERM stops everything with exit 0."""
        server = postgres_deployment.serve("serve-workers", "--workers", "2")
        before = scrape(server)
        placed = 0
        for _ in range(12):
            # A new connection each time, so both processes get some of the requests.
            with server.client() as http:
                shop = Shop(http)
                order_id = shop.place(customer_id="cust-workers")
                placed += 1
                assert shop.read(f"/orders/{order_id}")["order_id"] == order_id
        after = scrape(server)
        counted = metric(
            after, "orderledger_http_requests_total", route="/orders", method="POST"
        ) - metric(before, "orderledger_http_requests_total", route="/orders", method="POST")
        assert counted == placed
        assert server.terminate() == 0, server.output()


class TestResponsesOnTheWire:
    def test_kept_alive_and_pipelined_requests_get_whole_responses_in_order(
        self, server: Server
    ) -> None:
        """Through the coalescing transport: one request at a time, then three sent at once
        on the same connection; every response whole (head, then exactly its body), in order."""
        url = httpx.URL(server.base_url)
        assert url.port is not None
        paths = ["/projections", "/healthz", "/projections/order_summaries"]

        def request(path: str) -> bytes:
            auth = f"Authorization: Bearer {server.admin_token}\r\n"
            return f"GET {path} HTTP/1.1\r\nHost: {url.host}\r\n{auth}\r\n".encode()

        with socket.create_connection((url.host, url.port), timeout=10) as client:
            stream = client.makefile("rb")
            one_by_one = []
            for path in paths:
                client.sendall(request(path))
                one_by_one.append(read_response(stream))
            client.sendall(b"".join(request(path) for path in paths))
            pipelined = [read_response(stream) for _ in paths]
        for (status, body), (again, body_again) in zip(one_by_one, pipelined, strict=True):
            assert status == again == 200
            assert json.loads(body).keys() == json.loads(body_again).keys()
        assert json.loads(pipelined[1][1]) == json.loads(one_by_one[1][1])  # /healthz
        assert json.loads(pipelined[2][1])["name"] == "order_summaries"


def read_response(stream: Any) -> tuple[int, bytes]:
    """One HTTP/1.1 response from a buffered socket file: status and body (by Content-Length)."""
    status_line = stream.readline()
    status = int(status_line.split(b" ")[1])
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, stream.read(length)


@pytest.mark.postgres
class TestPostgresSchema:
    """A `?schema=` database URL keeps every table of the deployment in that schema."""

    def test_a_deployment_in_its_own_schema_serves_and_leaves_public_empty(
        self, postgres_url: str, deploy: Any
    ) -> None:
        """Keys, events, read models and effects live in the schema; commands and reads work."""
        deployment = deploy(f"{postgres_url}?schema=ledger")
        server = deployment.serve()
        with server.client() as http:
            shop = Shop(http)
            order_id = shop.place(customer_id="cust-schema")
            assert shop.read(f"/orders/{order_id}")["customer_id"] == "cust-schema"
            assert shop.read("/customers/cust-schema")["orders"] == 1
        deployment.run("status")

        with psycopg.connect(postgres_url) as conn:
            rows = conn.execute(
                "SELECT table_schema, table_name FROM information_schema.tables "
                "WHERE table_schema IN ('public', 'ledger')"
            ).fetchall()
        in_public = [name for schema, name in rows if schema == "public"]
        in_ledger = {name for schema, name in rows if schema == "ledger"}
        assert in_public == []
        assert {"orderledger_events", "api_keys"} <= in_ledger
        assert any(name.startswith("order_summaries") for name in in_ledger), in_ledger
        assert any("effect" in name or "outbox" in name for name in in_ledger), in_ledger

    def test_a_schema_name_that_is_not_a_plain_identifier_is_refused(
        self, postgres_url: str, deploy: Any
    ) -> None:
        """The CLI says what a schema name may be instead of failing inside the driver."""
        deployment = deploy(f"{postgres_url}?schema=Ledger;drop")
        completed = deployment.finish("status")
        assert completed.popen.returncode != 0
        assert "lower-case name" in completed.stderr() + completed.stdout()
