"""Every status and list command is readable at 80 columns and prints the same data as --json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from api.cli.main import app
from projections.engine.runtime import ProjectionRuntime
from tests.integration.effects.test_effects_cli import add_webhook
from tests.support.projections import run_until_caught_up
from tests.support.stores import open_ledger_at

WIDTH = 80
LONG_URL = "https://hooks.example.com/orderledger/events/receiver-with-a-rather-long-path"


def run(url: str, *args: str) -> str:
    """Run the CLI as on an 80-column terminal; its output."""
    env = {"COLUMNS": str(WIDTH), "ORDERLEDGER_DATABASE_URL": None}
    result: Result = CliRunner().invoke(app, [*args, "--database-url", url], env=env)
    assert result.exit_code == 0, result.output
    return result.output


def at_80_columns(url: str, *args: str) -> str:
    """The command's tables, every line within the width."""
    output = run(url, *args)
    too_wide = [line for line in output.splitlines() if len(line) > WIDTH]
    assert not too_wide, output
    return output


def as_json(url: str, *args: str) -> Any:
    return json.loads(run(url, *args, "--json"))


@pytest.fixture
def busy_store(sqlite_url: str) -> Iterator[str]:
    """A store with a key, a webhook, an order, its pending effect and built read models."""
    result = CliRunner().invoke(
        app,
        ["keys", "create", "--role", "reader", "--name", "dashboard", "--database-url", sqlite_url],
    )
    assert result.exit_code == 0, result.output
    add_webhook(sqlite_url, LONG_URL)
    ledger = open_ledger_at(sqlite_url)
    runtime = ProjectionRuntime.open(ledger, sqlite_url)
    try:
        ledger.place_order(
            customer_id="cust-1",
            currency="EUR",
            lines=[{"sku": "MUG-1", "quantity": 1, "unit_price": 900}],
        )
        run_until_caught_up(runtime)
    finally:
        runtime.close()
        ledger.close()
    yield sqlite_url


class TestAt80Columns:
    def test_status_shows_every_projection_name_whole(self, busy_store: str) -> None:
        """No projection name is cut (`order_su…`); --json has the same projections."""
        shown = at_80_columns(busy_store, "status")
        assert "order_summaries" in shown, shown
        document = as_json(busy_store, "status")
        names = [row["name"] for row in document["projections"]]
        assert "order_summaries" in names
        for name in names:
            assert name in shown, shown
        assert document["effects"] == [{"pending": 1, "delivered": 0, "dead": 0, "cancelled": 0}]
        summaries = next(row for row in document["projections"] if row["name"] == "order_summaries")
        assert summaries["state"] == "live" and summaries["lag_events"] == 0

    def test_effects_list_shows_each_id_whole(self, busy_store: str) -> None:
        shown = at_80_columns(busy_store, "effects", "list")
        [effect] = as_json(busy_store, "effects", "list")
        assert effect["id"] in shown, shown
        assert effect["status"] == "pending" and effect["position"] == 1

    def test_webhooks_list_shows_each_id_whole(self, busy_store: str) -> None:
        shown = at_80_columns(busy_store, "webhooks", "list")
        [subscription] = as_json(busy_store, "webhooks", "list")
        assert subscription["id"] in shown, shown
        assert subscription["url"] == LONG_URL
        assert subscription["active"] is True

    def test_keys_list_shows_each_key_id_whole(self, busy_store: str) -> None:
        shown = at_80_columns(busy_store, "keys", "list")
        [key] = as_json(busy_store, "keys", "list")
        assert key["key_id"] in shown, shown
        assert (key["name"], key["role"], key["status"]) == ("dashboard", "reader", "active")
