"""orderledger audit log, checkpoint and verify against real stores."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from domain.audit import Actor, CommandContext, acting_as
from domain.ledger import OrderLedger
from projections.engine.runtime import ProjectionRuntime
from tests.integration.cli.test_cli import assert_clean_failure, invoke
from tests.support.projections import run_until_caught_up
from tests.support.raw_events import RawEvents

LINE = {"sku": "SKU-1", "quantity": 1, "unit_price": 1500}


class Recorded:
    def __init__(self, ledger: OrderLedger, url: str) -> None:
        self.url = url
        clerk = CommandContext(Actor("key", "k_clerk", "clerk", "writer"), "req-1", "corr-1")
        with acting_as(clerk):
            placed = ledger.place_order(customer_id="c-1", currency="EUR", lines=[LINE])
            ledger.capture_payment(placed.order_id, amount=1500, payment_reference="pay-1")
        self.order_id = placed.order_id
        self.other = ledger.place_order(customer_id="c-2", currency="EUR", lines=[LINE])
        self.head = self.other.position
        self.raw = RawEvents(url, ledger.recorder.events_table_name)

    def audit(self, *args: str) -> tuple[int, str]:
        result = invoke("audit", *args, "--database-url", self.url)
        return result.exit_code, result.output


@pytest.fixture
def recorded(ledger: OrderLedger, runtime: ProjectionRuntime, store_url: str) -> Recorded:
    recorded = Recorded(ledger, store_url)
    run_until_caught_up(runtime, ["audit_log"])
    return recorded


class TestLog:
    def test_exports_json_and_csv_with_filters(self, recorded: Recorded) -> None:
        code, out = recorded.audit("log", "--format", "json", "--order", "asc", "--limit", "0")
        assert code == 0, out
        entries = json.loads(out)
        assert [e["position"] for e in entries] == list(range(1, recorded.head + 1))
        assert entries[1]["actor_id"] == "k_clerk"
        assert entries[1]["event_type"] == "PaymentCaptured"

        code, out = recorded.audit("log", "--format", "csv", "--actor", "k_clerk")
        assert code == 0, out
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [(r["version"], r["correlation_id"]) for r in rows] == [
            ("2", "corr-1"),
            ("1", "corr-1"),
        ]
        assert {r["order_id"] for r in rows} == {str(recorded.order_id)}

        code, out = recorded.audit("log", "--type", "OrderPlaced", "--from", "2000-01-01T00:00Z")
        assert code == 0, out
        assert "Audit log" in out
        assert out.count("OrderPlaced") == 2

    def test_a_moment_without_timezone_is_a_usage_error(self, recorded: Recorded) -> None:
        result = invoke(
            "audit", "log", "--from", "2026-01-01T00:00", "--database-url", recorded.url
        )
        assert_clean_failure(result, 2, "has no timezone")


class TestCheckpointAndVerify:
    def test_a_checkpoint_kept_in_a_file_catches_what_the_database_no_longer_shows(
        self, recorded: Recorded, runtime: ProjectionRuntime, tmp_path: Path
    ) -> None:
        kept = tmp_path / "checkpoint.json"
        code, out = recorded.audit("checkpoint", "--output", str(kept))
        assert code == 0, out
        assert json.loads(kept.read_text())["position"] == recorded.head

        code, out = recorded.audit("verify", "--checkpoint", str(kept))
        assert (code, "OK: every link holds." in out) == (0, True), out
        assert "Checkpoints matched: 2." in out

        with runtime.engine.connect() as conn:
            table = runtime.catalog.serving_tables(conn, "audit_log")["audit_log"].name
        position = recorded.other.position
        recorded.raw.delete(position)
        recorded.raw.as_owner(
            f"DELETE FROM {table} WHERE position = {position}", "DELETE FROM audit_checkpoints"
        )

        code, out = recorded.audit("verify")
        assert code == 0, "the database alone no longer shows the deletion"
        code, out = recorded.audit("verify", "--checkpoint", str(kept), "--json")
        assert code == 1, out
        report = json.loads(out)
        assert report["problem"]["kind"] == "truncated"
        assert report["problem"]["position"] == position

    def test_an_altered_event_fails_verify_for_the_store_and_its_order(
        self, recorded: Recorded
    ) -> None:
        history_position = 2
        recorded.raw.rewrite_state(history_position, b"pay-1", b"pay-7")

        code, out = recorded.audit("verify")
        assert code == 1
        assert "BROKEN (altered)" in out and f"position {history_position}" in out
        code, out = recorded.audit("verify", "--order", str(recorded.order_id))
        assert code == 1
        code, out = recorded.audit("verify", "--order", str(recorded.other.order_id))
        assert code == 0, out

    def test_bad_arguments_are_one_line_errors(self, recorded: Recorded, tmp_path: Path) -> None:
        garbage = tmp_path / "garbage.json"
        garbage.write_text("{not json")
        result = invoke(
            "audit", "verify", "--checkpoint", str(garbage), "--database-url", recorded.url
        )
        assert_clean_failure(result, 2, "not JSON")
        unknown = "0b4a5f8e-6f2d-4c1e-9a57-3d2f1e0c9b8a"
        result = invoke("audit", "verify", "--order", unknown, "--database-url", recorded.url)
        assert_clean_failure(result, 1, "not found")
