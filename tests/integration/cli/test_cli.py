"""The orderledger command line against real stores, and `orderledger serve` as a real process."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from click.testing import Result
from eventsourcing.utils import get_topic
from typer.testing import CliRunner

from api.cli.main import app
from api.cli.orders import format_money
from api.key_store import Role
from domain.order import Order, OrderStatus
from tests import REPO_ROOT
from tests.support.auth import bearer, issue_key
from tests.support.ports import free_port
from tests.support.processes import cli_env
from tests.support.stores import open_ledger_at

REPO = REPO_ROOT
CURRENCIES = {"EUR", "USD", "GBP", "JPY"}


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """Run the CLI in-process, wide enough that rich never wraps a table cell we look for."""
    environment = {"COLUMNS": "250", "ORDERLEDGER_DATABASE_URL": None, **(env or {})}
    return CliRunner().invoke(app, list(args), env=environment)


def assert_clean_failure(result: Result, exit_code: int, message: str) -> None:
    """The command failed with one readable error line and no traceback."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    assert message in lines[0]


def placed_orders(url: str) -> list[Order]:
    """Every order in the store, in the order they were placed, read through OrderLedger."""
    ledger = open_ledger_at(url)
    try:
        notifications = ledger.recorder.select_notifications(
            start=1, limit=1_000_000, topics=[get_topic(Order.Placed)]
        )
        return [ledger.get_order(n.originator_id) for n in notifications]
    finally:
        ledger.close()


def head_position(url: str) -> int:
    ledger = open_ledger_at(url)
    try:
        return ledger.head_position()
    finally:
        ledger.close()


def event_types(url: str, order_id: UUID) -> list[str]:
    ledger = open_ledger_at(url)
    try:
        return [entry.type for entry in ledger.order_history(order_id)]
    finally:
        ledger.close()


def assert_whole_lifecycle(url: str, orders: list[Order]) -> None:
    """The orders reach every status and every money situation the demo promises."""
    assert {order.status for order in orders} == set(OrderStatus.ALL)
    assert {order.currency for order in orders} == CURRENCIES
    assert len({order.customer_id for order in orders}) > 3
    cancelled = [order for order in orders if order.status == OrderStatus.CANCELLED]
    assert any(order.refund_due > 0 for order in cancelled), "cancelled with refund due"
    assert any(order.captured == 0 for order in cancelled), "cancelled before payment"
    assert any(order.refunded > 0 and order.refund_due == 0 for order in cancelled), (
        "cancelled and refunded"
    )
    assert any(order.status == OrderStatus.DELIVERED and order.refunded > 0 for order in orders), (
        "delivered, then part refunded"
    )
    partly = [order for order in orders if order.status == OrderStatus.PARTIALLY_PAID]
    assert all(0 < order.captured < order.total for order in partly)
    edited = [
        order
        for order in orders
        if {"OrderLineAdded", "OrderLineRemoved"} <= set(event_types(url, order.id))
    ]
    assert edited, "an order with a line added and removed before payment"
    for order in orders:
        assert all(isinstance(line.unit_price, int) for line in order.lines.values())
        assert order.balance_due >= 0
        assert order.refund_due >= 0


def demo_fingerprint(url: str) -> list[dict[str, Any]]:
    """What the demo recorded, without the ids and times that differ on every run."""
    volatile = {"order_id", "placed_at", "updated_at", "shipped_at", "delivered_at", "cancelled_at"}
    return [
        {
            **{k: v for k, v in order.snapshot().items() if k not in volatile},
            "events": event_types(url, order.id),
        }
        for order in placed_orders(url)
    ]


class TestDemo:
    def test_demo_records_the_requested_orders_across_the_whole_lifecycle(
        self, sqlite_url: str
    ) -> None:
        """Twelve demo orders reach every status, currency and refund situation."""
        result = invoke("demo", "--orders", "12", "--seed", "1", "--database-url", sqlite_url)

        assert result.exit_code == 0, result.output
        assert "Recorded 12 orders" in result.output
        orders = placed_orders(sqlite_url)
        assert len(orders) == 12
        assert_whole_lifecycle(sqlite_url, orders)

    @pytest.mark.postgres
    def test_demo_records_the_whole_lifecycle_on_postgresql(self, postgres_url: str) -> None:
        """The demo works the same on PostgreSQL."""
        result = invoke("demo", "--orders", "12", "--seed", "2", "--database-url", postgres_url)

        assert result.exit_code == 0, result.output
        orders = placed_orders(postgres_url)
        assert len(orders) == 12
        assert_whole_lifecycle(postgres_url, orders)

    def test_if_empty_records_nothing_when_the_store_has_events(self, sqlite_url: str) -> None:
        """--if-empty leaves a store with events untouched and says so."""
        assert invoke("demo", "-n", "3", "--database-url", sqlite_url).exit_code == 0
        before = head_position(sqlite_url)

        result = invoke("demo", "--if-empty", "-n", "5", "--database-url", sqlite_url)

        assert result.exit_code == 0, result.output
        assert f"already has {before} events" in result.output
        assert head_position(sqlite_url) == before
        assert len(placed_orders(sqlite_url)) == 3

    def test_if_empty_records_orders_in_an_empty_store(self, sqlite_url: str) -> None:
        """--if-empty on an empty store records the demo as usual."""
        result = invoke("demo", "--if-empty", "-n", "4", "--database-url", sqlite_url)

        assert result.exit_code == 0, result.output
        assert len(placed_orders(sqlite_url)) == 4

    def test_the_same_seed_records_the_same_orders(self, tmp_path: Path) -> None:
        """Two stores seeded alike hold the same orders, lines, amounts and events."""
        urls = [f"sqlite:///{tmp_path}/{name}.db" for name in ("a", "b", "c")]
        for url, seed in zip(urls, ("42", "42", "43"), strict=True):
            result = invoke("demo", "-n", "15", "--seed", seed, "--database-url", url)
            assert result.exit_code == 0, result.output

        first, second, other = (demo_fingerprint(url) for url in urls)

        assert len(first) == 15
        assert first == second
        assert first != other

    def test_demo_refuses_fewer_than_one_order(self, sqlite_url: str) -> None:
        """--orders 0 is a usage error and records nothing."""
        result = invoke("demo", "-n", "0", "--database-url", sqlite_url)

        assert_clean_failure(result, 2, "--orders must be 1 or more")
        assert head_position(sqlite_url) == 0


@pytest.fixture
def shipped_order(sqlite_url: str) -> UUID:
    """A euro order placed, paid in full and shipped: versions 1 to 3."""
    ledger = open_ledger_at(sqlite_url)
    try:
        placed = ledger.place_order(
            customer_id="cus-1001-lena-hoffmann",
            currency="EUR",
            lines=[
                {"sku": "MUG-CER-350", "quantity": 2, "unit_price": 1290},
                {"sku": "KB-MECH-TKL", "quantity": 1, "unit_price": 123450},
            ],
            shipping_address="Marktstrasse 12, 10115 Berlin, DE",
        )
        ledger.capture_payment(placed.order_id, amount=126030, payment_reference="pay_0001")
        ledger.ship_order(placed.order_id, carrier="DHL", tracking_number="JD0146000123")
        return placed.order_id
    finally:
        ledger.close()


class TestAudit:
    def test_audit_prints_the_history_and_the_resulting_state(
        self, sqlite_url: str, shipped_order: UUID
    ) -> None:
        """Every event appears with its position, and the state shows formatted money."""
        result = invoke("audit", str(shipped_order), "--database-url", sqlite_url)

        assert result.exit_code == 0, result.output
        out = result.output
        assert str(shipped_order) in out
        for event in ("OrderPlaced", "PaymentCaptured", "OrderShipped"):
            assert event in out
        assert out.index("OrderPlaced") < out.index("PaymentCaptured") < out.index("OrderShipped")
        assert "2 x MUG-CER-350 @ EUR 12.90" in out
        assert "EUR 1,260.30 | ref pay_0001" in out
        assert "DHL JD0146000123" in out
        assert "shipped" in out
        assert "Balance due" in out
        assert "EUR 1,234.50" in out
        assert "State at version 3 (latest)" in out

    def test_audit_at_a_version_shows_the_order_as_it_was_then(
        self, sqlite_url: str, shipped_order: UUID
    ) -> None:
        """--at-version 2 shows a paid order and leaves the shipment out."""
        result = invoke(
            "audit", str(shipped_order), "--at-version", "2", "--database-url", sqlite_url
        )

        assert result.exit_code == 0, result.output
        assert "State at version 2 (of 3)" in result.output
        assert "│ paid" in result.output
        assert "OrderShipped" not in result.output
        assert "1 later event(s) not shown" in result.output

    def test_audit_at_a_moment_shows_the_order_as_it_was_then(
        self, sqlite_url: str, shipped_order: UUID
    ) -> None:
        """--at the moment of the first event shows the order just placed."""
        ledger = open_ledger_at(sqlite_url)
        placed_at = ledger.order_history(shipped_order)[0].timestamp
        ledger.close()

        result = invoke(
            "audit", str(shipped_order), "--at", placed_at.isoformat(), "--database-url", sqlite_url
        )

        assert result.exit_code == 0, result.output
        assert "State at version 1 (of 3)" in result.output
        assert "pending_payment" in result.output

    def test_audit_shows_yen_without_decimals(self, sqlite_url: str) -> None:
        """JPY has no minor units, so 1650 is JPY 1,650."""
        ledger = open_ledger_at(sqlite_url)
        placed = ledger.place_order(
            customer_id="cus-1004-haruto-sato",
            currency="JPY",
            lines=[{"sku": "MUG-CER-350", "quantity": 1, "unit_price": 1650}],
        )
        ledger.close()

        result = invoke("audit", str(placed.order_id), "--database-url", sqlite_url)

        assert result.exit_code == 0, result.output
        assert "JPY 1,650" in result.output
        assert "16.50" not in result.output


class TestAuditErrors:
    def test_an_unknown_order_is_a_clean_error(self, sqlite_url: str) -> None:
        """An id with no events exits 1 with 'not found'."""
        missing = "00000000-0000-0000-0000-000000000001"
        result = invoke("audit", missing, "--database-url", sqlite_url)

        assert_clean_failure(result, 1, f"order {missing} not found")

    def test_a_malformed_order_id_is_a_usage_error(self, sqlite_url: str) -> None:
        """An id that is not a UUID exits 2 and names the bad input."""
        result = invoke("audit", "order-42", "--database-url", sqlite_url)

        assert_clean_failure(result, 2, "'order-42' is not an order id")

    def test_a_version_and_a_moment_together_are_a_usage_error(
        self, sqlite_url: str, shipped_order: UUID
    ) -> None:
        """--at-version and --at together exit 2."""
        result = invoke(
            "audit",
            str(shipped_order),
            "--at-version",
            "1",
            "--at",
            "2030-01-01T00:00:00Z",
            "--database-url",
            sqlite_url,
        )

        assert_clean_failure(result, 2, "give either --at-version or --at, not both")

    def test_a_moment_without_timezone_is_a_usage_error(
        self, sqlite_url: str, shipped_order: UUID
    ) -> None:
        """A naive --at time exits 2 and asks for a timezone."""
        result = invoke(
            "audit", str(shipped_order), "--at", "2030-01-01T00:00", "--database-url", sqlite_url
        )

        assert_clean_failure(result, 2, "--at '2030-01-01T00:00' has no timezone")

    def test_a_version_beyond_the_latest_is_a_clean_error(
        self, sqlite_url: str, shipped_order: UUID
    ) -> None:
        """Asking for version 9 of a three-event order exits 1 and names the latest."""
        result = invoke(
            "audit", str(shipped_order), "--at-version", "9", "--database-url", sqlite_url
        )

        assert_clean_failure(result, 1, "has no version 9 (latest is 3)")

    def test_a_moment_before_the_order_existed_is_a_clean_error(
        self, sqlite_url: str, shipped_order: UUID
    ) -> None:
        """--at before the order was placed exits 1."""
        result = invoke(
            "audit", str(shipped_order), "--at", "2001-01-01T00:00Z", "--database-url", sqlite_url
        )

        assert_clean_failure(result, 1, "did not exist yet")


class TestStoreErrors:
    def test_an_unsupported_database_url_is_a_usage_error(self) -> None:
        """A mysql:// URL exits 2 naming the supported schemes."""
        result = invoke("demo", "-n", "1", "--database-url", "mysql://db/orders")

        assert_clean_failure(result, 2, "bad database URL 'mysql://db/orders'")
        assert "sqlite:///" in result.output

    def test_a_password_never_appears_in_an_error(self) -> None:
        """The URL in a store error has its password masked."""
        result = invoke("audit", str(UUID(int=1)), "--database-url", "mysql://u:s3cret@db/x")

        assert result.exit_code == 2
        assert "s3cret" not in result.output
        assert "mysql://u:***@db/x" in result.output

    def test_serve_with_a_bad_database_url_fails_before_listening(self) -> None:
        """serve refuses a bad store with one line instead of a failed start-up traceback."""
        result = invoke("serve", "--port", "1", "--database-url", "sqlite:///")

        assert_clean_failure(result, 2, "bad database URL 'sqlite:///'")

    def test_an_invalid_setting_from_the_environment_is_a_usage_error(
        self, sqlite_url: str
    ) -> None:
        """ORDERLEDGER_PORT=eighty exits 2 naming the setting."""
        result = CliRunner().invoke(
            app, ["serve", "--database-url", sqlite_url], env={"ORDERLEDGER_PORT": "eighty"}
        )

        assert_clean_failure(result, 2, "invalid settings: port:")

    def test_the_console_script_reports_any_command_error_in_one_line(self) -> None:
        """An error no command catches still exits non-zero with one line and no traceback."""
        completed = subprocess.run(
            [sys.executable, "-m", "api.cli.main", "status", "--database-url", "mysql://db/orders"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

        assert completed.returncode == 2, completed.stderr
        assert "Traceback" not in completed.stderr
        assert completed.stderr.strip().splitlines() == [
            "Error: unsupported database URL scheme 'mysql': use sqlite:/// or postgresql://"
        ]


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        (123450, "EUR", "EUR 1,234.50"),
        (7, "USD", "USD 0.07"),
        (0, "GBP", "GBP 0.00"),
        (1650, "JPY", "JPY 1,650"),
        (1005, "KWD", "KWD 1.005"),
    ],
)
def test_money_is_formatted_with_the_currency_exponent(
    amount: int, currency: str, text: str
) -> None:
    """Minor units are shown with as many decimals as the currency has."""
    assert format_money(amount, currency) == text


@pytest.fixture
def server(sqlite_url: str, tmp_path: Path) -> Iterator[str]:
    """`orderledger serve` running as its own process; yields its base URL."""
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "api.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=cli_env(database_url=sqlite_url),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"serve exited early: {(tmp_path / 'serve.log').read_text()}")
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"serve never answered: {(tmp_path / 'serve.log').read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


class TestServe:
    def test_serve_takes_an_order_over_http_and_records_it(
        self, server: str, sqlite_url: str
    ) -> None:
        """An order POSTed to the served API has a history and lands in the SQLite store."""
        headers = bearer(issue_key(sqlite_url, Role.writer))
        with httpx.Client(base_url=server, timeout=10, headers=headers) as client:
            created = client.post(
                "/orders",
                json={
                    "customer_id": "cus-1002-james-carter",
                    "currency": "USD",
                    "lines": [{"sku": "MS-WL-ERGO", "quantity": 1, "unit_price": 7499}],
                },
            )
            assert created.status_code == 201, created.text
            order_id = created.json()["order_id"]

            history = client.get(f"/orders/{order_id}/history")

        assert history.status_code == 200, history.text
        events = history.json()["events"]
        assert [event["type"] for event in events] == ["OrderPlaced"]
        assert events[0]["data"]["lines"] == [
            {"sku": "MS-WL-ERGO", "quantity": 1, "unit_price": 7499}
        ]
        assert [order.id for order in placed_orders(sqlite_url)] == [UUID(order_id)]
