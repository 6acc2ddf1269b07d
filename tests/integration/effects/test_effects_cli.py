"""Side effects from the command line: `orderledger webhooks`, `effects` and `status`.

Commands run in-process (typer's CliRunner) against a real store; where deliveries matter the
app runs beside them with its dispatcher, POSTing to a real receiver on loopback.
"""

from __future__ import annotations

import logging
import re
import warnings

import pytest
from click.testing import Result
from sqlalchemy import select
from starlette.exceptions import StarletteDeprecationWarning
from typer.testing import CliRunner

from api.cli.main import app
from api.http.app import create_app
from projections.effects.outbox import effects
from projections.engine.runtime import ProjectionRuntime
from tests import LOCAL_RECEIVERS
from tests.integration.effects.test_effects_api import (
    count,
    delete_outbox_rows,
    fast_settings,
    place_order,
)
from tests.support.auth import admin
from tests.support.projections import run_until_caught_up
from tests.support.receivers import WebhookReceiver
from tests.support.stores import open_ledger_at
from tests.support.waiting import wait_for

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def invoke(url: str, *args: str) -> Result:
    """Run the CLI in-process on the store at ``url``, wide enough that rich never wraps."""
    env = {
        "COLUMNS": "250",
        "ORDERLEDGER_DATABASE_URL": None,
        "ORDERLEDGER_WEBHOOK_ALLOWED_NETWORKS": LOCAL_RECEIVERS,
    }
    return CliRunner().invoke(app, [*args, "--database-url", url], env=env)


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def assert_clean_failure(result: Result, exit_code: int, message: str) -> None:
    """The command failed with one readable error line and no traceback."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    assert message in lines[0]


def add_webhook(url: str, target: str, *events: str) -> tuple[str, str]:
    """Subscribe ``target`` with the CLI; returns the subscription's id and its secret."""
    options = [part for event in events for part in ("--event", event)]
    output = ok(invoke(url, "webhooks", "add", target, *options))
    subscription = re.search(rf"Subscription ({UUID_PATTERN})", output)
    secret = re.search(r"Secret:\s+(whsec_\S+)", output)
    assert subscription is not None and secret is not None, output
    return subscription.group(1), secret.group(1)


def effect_counts(status_output: str) -> dict[str, int]:
    """The counts in the effects table of `orderledger status`."""
    lines = status_output.splitlines()
    header = next(i for i, line in enumerate(lines) if "pending" in line and "dead" in line)
    names = re.findall(r"[a-z]+", lines[header])
    values = next(
        [int(v) for v in re.findall(r"\d+", line)]
        for line in lines[header + 1 :]
        if re.search(r"\d", line)
    )
    return dict(zip(names, values, strict=True))


class TestWebhooksCommands:
    def test_adding_prints_the_secret_once_and_listing_never_does(
        self, sqlite_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """`webhooks add` shows the secret; `webhooks list` shows the subscription without it."""
        caplog.set_level(logging.DEBUG)
        subscription_id, secret = add_webhook(
            sqlite_url, "https://example.com/hooks", "OrderPlaced", "OrderShipped"
        )
        listed = ok(invoke(sqlite_url, "webhooks", "list"))
        assert subscription_id in listed
        assert "https://example.com/hooks" in listed
        assert "OrderPlaced, OrderShipped" in listed
        assert "1 subscription(s)" in listed
        assert secret not in listed
        assert "whsec_" not in listed
        assert secret not in caplog.text

    def test_removing_a_subscription_takes_it_off_the_list(self, sqlite_url: str) -> None:
        """After `webhooks remove` the list no longer shows it; `--all` shows it inactive."""
        kept, _ = add_webhook(sqlite_url, "https://example.com/kept")
        removed, _ = add_webhook(sqlite_url, "https://example.com/removed")
        assert f"Removed subscription {removed}" in ok(
            invoke(sqlite_url, "webhooks", "remove", removed)
        )
        listed = ok(invoke(sqlite_url, "webhooks", "list"))
        assert kept in listed
        assert removed not in listed
        everything = ok(invoke(sqlite_url, "webhooks", "list", "--all"))
        assert re.search(rf"{removed}.*\bno\b", everything), everything

    def test_removing_an_unknown_subscription_fails_cleanly(self, sqlite_url: str) -> None:
        """An id that names no active subscription is one error line and exit code 1."""
        result = invoke(sqlite_url, "webhooks", "remove", "00000000-0000-0000-0000-000000000000")
        assert_clean_failure(result, 1, "no active subscription")

    @pytest.mark.parametrize(
        ("arguments", "message"),
        [
            (["ftp://example.com/hooks"], "is not an http(s) URL"),
            (["https://example.com/" + "a" * 2100], "is not an http(s) URL"),
            (["https://example.com/h", "--event", "OrderTeleported"], "unknown event types"),
        ],
    )
    def test_a_bad_url_or_event_type_is_a_usage_error(
        self, sqlite_url: str, arguments: list[str], message: str
    ) -> None:
        """Bad input exits 2 with the reason and subscribes nothing."""
        assert_clean_failure(invoke(sqlite_url, "webhooks", "add", *arguments), 2, message)
        assert "0 subscription(s)" in ok(invoke(sqlite_url, "webhooks", "list"))


class TestEffectsCommands:
    def test_dead_effects_show_in_the_list_and_status_until_retried(
        self, sqlite_url: str, receiver: WebhookReceiver
    ) -> None:
        """A receiver answering 500 leaves dead effects; `effects retry --all-dead` sends them."""
        receiver.status = 500
        add_webhook(sqlite_url, receiver.url)
        with TestClient(create_app(fast_settings(sqlite_url)), headers=admin(sqlite_url)) as client:
            order_id = place_order(client)
            wait_for(lambda: count(client, "dead") == 1, "the effect to go dead")
            [dead] = client.get("/effects", params={"status": "dead"}).json()["data"]

            listed = ok(invoke(sqlite_url, "effects", "list", "--status", "dead"))
            row = next(line for line in listed.splitlines() if dead["id"] in line)
            for cell in (dead["effect"], order_id, str(dead["position"]), "dead", "HTTP 500"):
                assert cell in row
            assert "1 effect(s)" in listed
            assert "0 effect(s)" in ok(invoke(sqlite_url, "effects", "list", "--status", "pending"))

            status = ok(invoke(sqlite_url, "status"))
            assert effect_counts(status) == {
                "pending": 0,
                "delivered": 0,
                "dead": 1,
                "cancelled": 0,
            }
            assert "1 dead effect(s)" in status

            # The receiver is fixed; a retry sends the dead effect again.
            receiver.status = 204
            retried = ok(invoke(sqlite_url, "effects", "retry", "--all-dead"))
            assert "1 dead effect(s) will be sent again." in retried
            wait_for(lambda: count(client, "delivered") == 1, "the retried delivery")
            assert [r.webhook_id for r in receiver.received()] == [dead["id"]] * 3

            status = ok(invoke(sqlite_url, "status"))
            assert effect_counts(status) == {
                "pending": 0,
                "delivered": 1,
                "dead": 0,
                "cancelled": 0,
            }
            assert "dead effect(s)" not in status
            assert client.get("/readyz").status_code == 200

    def test_retrying_one_effect_by_id(self, sqlite_url: str, receiver: WebhookReceiver) -> None:
        """`effects retry ID` sends that dead effect again; a delivered one is refused."""
        receiver.status = 500
        add_webhook(sqlite_url, receiver.url)
        with TestClient(create_app(fast_settings(sqlite_url)), headers=admin(sqlite_url)) as client:
            place_order(client)
            wait_for(lambda: count(client, "dead") == 1, "the effect to go dead")
            [dead] = client.get("/effects", params={"status": "dead"}).json()["data"]
            receiver.status = 204
            retried = ok(invoke(sqlite_url, "effects", "retry", dead["id"]))
            assert f"Effect {dead['id']}" in retried
            assert "pending" in retried
            wait_for(lambda: count(client, "delivered") == 1, "the retried delivery")
            again = invoke(sqlite_url, "effects", "retry", dead["id"])
            assert_clean_failure(again, 1, "is delivered, not dead")

    def test_retrying_an_unknown_effect_fails_cleanly(self, sqlite_url: str) -> None:
        """An id no effect has is one error line and exit code 1."""
        result = invoke(sqlite_url, "effects", "retry", "00000000-0000-0000-0000-000000000000")
        assert_clean_failure(result, 1, "no effect")

    @pytest.mark.parametrize("arguments", [[], ["some-id", "--all-dead"]])
    def test_retry_needs_an_id_or_all_dead(self, sqlite_url: str, arguments: list[str]) -> None:
        """Neither or both is a usage error."""
        result = invoke(sqlite_url, "effects", "retry", *arguments)
        assert_clean_failure(result, 2, "give an effect ID or --all-dead")

    @pytest.mark.parametrize("arguments", [["--status", "lost"], ["--limit", "0"]])
    def test_effects_list_refuses_odd_options(self, sqlite_url: str, arguments: list[str]) -> None:
        """An unknown status or a limit below 1 is a usage error."""
        result = invoke(sqlite_url, "effects", "list", *arguments)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output


class TestReconcileCommand:
    def test_reconcile_records_nothing_when_healthy_and_exactly_the_lost_rows_otherwise(
        self, store_url: str
    ) -> None:
        """On a healthy outbox it records 0; after rows are deleted it records exactly those."""
        subscription_id, _ = add_webhook(store_url, "http://127.0.0.1:9/hooks")
        ledger = open_ledger_at(store_url)
        runtime = ProjectionRuntime.open(ledger, store_url)
        try:
            for n in range(3):
                ledger.place_order(
                    customer_id=f"cust-{n}",
                    currency="EUR",
                    lines=[{"sku": "MUG-1", "quantity": 1, "unit_price": 900}],
                )
            run_until_caught_up(runtime, ["outbox"])
            with runtime.engine.connect() as conn:
                ids = list(
                    conn.execute(select(effects.c.id).order_by(effects.c.position)).scalars()
                )
            assert len(ids) == 3

            healthy = ok(invoke(store_url, "effects", "reconcile"))
            assert "Reconciled: recorded 0 missing effect(s)." in healthy

            delete_outbox_rows(store_url, ids[:2])
            restored = ok(invoke(store_url, "effects", "reconcile"))
            assert "Reconciled: recorded 2 missing effect(s)." in restored
            with runtime.engine.connect() as conn:
                rows = list(conn.execute(select(effects).order_by(effects.c.position)))
            assert [row.id for row in rows] == ids
            assert {row.effect for row in rows} == {f"webhook:{subscription_id}"}
            assert all(row.status == "pending" for row in rows)

            again = ok(invoke(store_url, "effects", "reconcile"))
            assert "Reconciled: recorded 0 missing effect(s)." in again
            listed = ok(invoke(store_url, "effects", "list", "--status", "pending"))
            assert "3 effect(s)" in listed
        finally:
            runtime.close()
            ledger.close()

    def test_only_order_events_have_effects_even_for_a_subscription_to_everything(
        self, store_url: str
    ) -> None:
        """Commands with an Idempotency-Key also store an idempotency record; neither the
        outbox nor the reconciler records (and so sends) an effect for it."""
        add_webhook(store_url, "http://127.0.0.1:9/hooks", "*")
        ledger = open_ledger_at(store_url)
        runtime = ProjectionRuntime.open(ledger, store_url)
        try:
            for n in range(2):
                ledger.place_order(
                    customer_id=f"cust-{n}",
                    currency="EUR",
                    lines=[{"sku": "MUG-1", "quantity": 1, "unit_price": 900}],
                    idempotency_key=f"place-{n}",
                )
            run_until_caught_up(runtime, ["outbox"])

            def recorded() -> list[tuple[int, str]]:
                with runtime.engine.connect() as conn:
                    query = select(effects.c.position, effects.c.event_type)
                    rows = conn.execute(query.order_by(effects.c.position))
                    return [(row.position, row.event_type) for row in rows]

            by_outbox = recorded()
            assert [event_type for _, event_type in by_outbox] == ["OrderPlaced"] * 2
            assert "recorded 0 missing" in ok(invoke(store_url, "effects", "reconcile"))

            with runtime.engine.connect() as conn:
                ids = list(conn.execute(select(effects.c.id)).scalars())
            delete_outbox_rows(store_url, ids)
            assert "recorded 2 missing" in ok(invoke(store_url, "effects", "reconcile"))
            assert recorded() == by_outbox
        finally:
            runtime.close()
            ledger.close()
