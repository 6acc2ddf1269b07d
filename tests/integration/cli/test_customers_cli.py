"""orderledger customers: export, erase, rotate-key, new-master-key; and no master key."""

from __future__ import annotations

import json

from domain.ledger import OrderLedger
from domain.personal import ERASED, parse_master_key
from projections.engine.runtime import ProjectionRuntime
from tests import MASTER_KEY
from tests.integration.cli.test_cli import assert_clean_failure, invoke
from tests.support.projections import run_until_caught_up

LINE = {"sku": "SKU-1", "quantity": 1, "unit_price": 1500}
ADDRESS = "Calle Mayor 7, 28013 Madrid"


def test_export_and_erase(ledger: OrderLedger, runtime: ProjectionRuntime, store_url: str) -> None:
    ledger.place_order(
        customer_id="cust-ana", currency="EUR", lines=[LINE], shipping_address=ADDRESS
    )
    run_until_caught_up(runtime, ["order_summaries"])

    exported = invoke("customers", "export", "cust-ana", "--database-url", store_url)
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.output)["orders"][0]["shipping_address"] == ADDRESS

    erased = invoke(
        "customers", "erase", "cust-ana", "--reason", "ticket 42", "--database-url", store_url
    )
    assert erased.exit_code == 0, erased.output
    assert "1 data key(s) deleted" in erased.output
    again = invoke("customers", "export", "cust-ana", "--database-url", store_url)
    assert json.loads(again.output)["orders"][0]["shipping_address"] == ERASED


def test_a_new_master_key_is_a_valid_one() -> None:
    printed = invoke("customers", "new-master-key")
    assert printed.exit_code == 0
    assert len(parse_master_key(printed.output)) == 32
    assert printed.output.strip() != MASTER_KEY


def test_without_a_master_key_commands_stop_with_one_line(sqlite_url: str) -> None:
    result = invoke(
        "demo", "-n", "1", "--database-url", sqlite_url, env={"ORDERLEDGER_MASTER_KEY": None}
    )
    assert_clean_failure(result, 2, "ORDERLEDGER_MASTER_KEY is not set")
