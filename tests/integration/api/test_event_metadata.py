"""Every event records who issued its command, on which request, in which conversation, and
why; the history shows it, and events recorded before metadata existed read as unknown."""

from __future__ import annotations

import getpass
import logging
import re
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from api.cli.main import app as cli
from domain.audit import UNKNOWN
from domain.order import Order
from tests.support.http import order_body
from tests.support.stores import open_ledger_at

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def _writer(client: TestClient) -> tuple[dict[str, str], dict[str, Any]]:
    """A new writer key made through the API: its headers and the key as the API showed it."""
    issued = client.post("/keys", json={"role": "writer", "name": "checkout"})
    assert issued.status_code == 201, issued.text
    key: dict[str, Any] = issued.json()
    return {"Authorization": f"Bearer {key['token']}"}, key


def _history(client: TestClient, order_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/orders/{order_id}/history")
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


class TestOverHttp:
    def test_each_event_names_the_key_the_request_the_correlation_and_the_command(
        self, client: TestClient
    ) -> None:
        headers, key = _writer(client)
        placed = client.post(
            "/orders",
            json=order_body(),
            headers={**headers, "X-Request-ID": "req-place-1", "Correlation-Id": "checkout-77"},
        )
        assert placed.status_code == 201, placed.text
        order_id = placed.json()["order_id"]
        paid = client.post(
            f"/orders/{order_id}/payments",
            json={"amount": 1000, "payment_reference": "psp-1"},
            headers={**headers, "X-Request-ID": "req-pay-1", "Correlation-Id": "checkout-77"},
        )
        assert paid.status_code == 200, paid.text

        first, second = (event["metadata"] for event in _history(client, order_id))
        actor = {"kind": "key", "id": key["key_id"], "name": "checkout", "role": "writer"}
        assert first["actor"] == actor
        assert second["actor"] == actor
        assert (first["request_id"], second["request_id"]) == ("req-place-1", "req-pay-1")
        assert first["correlation_id"] == second["correlation_id"] == "checkout-77"
        assert first["causation_id"] != second["causation_id"]
        assert first["event_id"] != second["event_id"]
        for metadata in (first, second):
            uuid.UUID(metadata["event_id"])
            uuid.UUID(metadata["causation_id"])

    def test_each_event_has_its_own_id_and_each_command_its_own_causation(
        self, client: TestClient
    ) -> None:
        """Three commands: three causations, and no two events with one id."""
        headers, _ = _writer(client)
        order_id = client.post("/orders", json=order_body(), headers=headers).json()["order_id"]
        client.post(
            f"/orders/{order_id}/payments",
            json={"amount": 3000, "payment_reference": "psp-all"},
            headers=headers,
        )
        client.post(
            f"/orders/{order_id}/shipment",
            json={"carrier": "DHL", "tracking_number": "T1"},
            headers=headers,
        )
        metadata = [event["metadata"] for event in _history(client, order_id)]
        assert len({m["event_id"] for m in metadata}) == len(metadata)
        assert len({m["causation_id"] for m in metadata}) == 3

    def test_a_traceparent_gives_the_correlation_its_trace_id(self, client: TestClient) -> None:
        headers, _ = _writer(client)
        traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
        placed = client.post(
            "/orders", json=order_body(), headers={**headers, "traceparent": traceparent}
        )
        [event] = _history(client, placed.json()["order_id"])
        assert event["metadata"]["correlation_id"] == TRACE_ID

    def test_without_either_header_the_request_id_correlates(self, client: TestClient) -> None:
        headers, _ = _writer(client)
        placed = client.post(
            "/orders",
            json=order_body(),
            headers={**headers, "Correlation-Id": "has spaces and\tcontrols"},
        )
        generated = placed.headers["X-Request-ID"]
        [event] = _history(client, placed.json()["order_id"])
        assert event["metadata"]["request_id"] == generated
        assert event["metadata"]["correlation_id"] == generated

    def test_no_token_is_ever_recorded(self, client: TestClient) -> None:
        headers, key = _writer(client)
        placed = client.post("/orders", json=order_body(), headers=headers)
        [event] = _history(client, placed.json()["order_id"])
        assert key["token"] not in str(event)


class TestRequestLogs:
    def test_each_request_line_carries_its_correlation_id(
        self, client: TestClient, caplog: pytest.LogCaptureFixture
    ) -> None:
        headers, _ = _writer(client)
        with caplog.at_level(logging.INFO, logger="orderledger.http"):
            client.post(
                "/orders", json=order_body(), headers={**headers, "Correlation-Id": "order-flow-9"}
            )
            sent = client.get("/orders", headers={**headers, "X-Request-ID": "list-1"})
        assert sent.status_code == 200
        lines = {
            r.request_id: r.correlation_id for r in caplog.records if r.name == "orderledger.http"
        }
        assert "order-flow-9" in lines.values()
        assert lines["list-1"] == "list-1"


class TestOlderEvents:
    def test_an_event_recorded_without_metadata_reads_as_unknown(
        self, client: TestClient, sqlite_url: str
    ) -> None:
        """As events recorded before this change: saved straight through the library."""
        ledger = open_ledger_at(sqlite_url)
        try:
            order = Order.place(**order_body())
            ledger.save(order)
        finally:
            ledger.close()
        [event] = _history(client, str(order.id))
        assert event["metadata"] == {
            "event_id": UNKNOWN,
            "actor": {"kind": UNKNOWN, "id": UNKNOWN, "name": "", "role": ""},
            "request_id": UNKNOWN,
            "correlation_id": UNKNOWN,
            "causation_id": UNKNOWN,
        }


class TestFromTheCommandLine:
    def test_demo_orders_name_the_cli_and_the_user_and_audit_shows_it(
        self, sqlite_url: str
    ) -> None:
        runner = CliRunner()
        made = runner.invoke(cli, ["demo", "--orders", "1", "--database-url", sqlite_url])
        assert made.exit_code == 0, made.output
        ledger = open_ledger_at(sqlite_url)
        try:
            first = ledger.history_entry(ledger.recorder.select_notifications(start=1, limit=1)[0])
        finally:
            ledger.close()
        assert first is not None
        actor = first.metadata["actor"]
        assert actor == {
            "kind": "cli",
            "id": getpass.getuser(),
            "name": "orderledger demo",
            "role": "",
        }
        order_id = _order_of(sqlite_url)
        audited = runner.invoke(
            cli, ["audit", order_id, "--database-url", sqlite_url], env={"COLUMNS": "200"}
        )
        assert audited.exit_code == 0, audited.output
        assert "Recorded by" in audited.output
        assert re.search(
            rf"cli {re.escape(getpass.getuser())} \(orderledger demo\)", audited.output
        )


def _order_of(sqlite_url: str) -> str:
    ledger = open_ledger_at(sqlite_url)
    try:
        notification = ledger.recorder.select_notifications(start=1, limit=1)[0]
        return str(notification.originator_id)
    finally:
        ledger.close()
