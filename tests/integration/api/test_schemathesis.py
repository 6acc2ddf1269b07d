"""Schemathesis over /openapi.json: no input gives a 5xx, every answer matches its documentation.

The schema is read from the app itself; requests go to the app on a real store, with an admin
key so every operation is reachable. Orders in every state are placed first and most generated
commands are pointed at one of them, so commands meet real orders rather than only unknown ids.
Examples per operation are bounded and derandomized: a run is repeatable and takes bounded time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import get_client, shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    missing_required_header,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from api.http.app import create_app
from api.key_store import Role
from api.settings import Settings
from tests.support.auth import bearer, issue_key
from tests.support.http import order_body

EXAMPLES_PER_OPERATION = 30
EXAMPLES_PER_OPERATION_ON_POSTGRES = 8
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    missing_required_header,
    unsupported_method,
    allow_header_conformance,
]
# Commands that take an order from placed to each state it can be in.
LIFECYCLES: list[list[tuple[str, dict[str, object] | None]]] = [
    [],
    [("payments", {"amount": 1000, "payment_reference": "p-1"})],
    [("payments", {"amount": 3000, "payment_reference": "p-1"})],
    [
        ("payments", {"amount": 3000, "payment_reference": "p-1"}),
        ("shipment", {"carrier": "DHL", "tracking_number": "T-1"}),
    ],
    [
        ("payments", {"amount": 3000, "payment_reference": "p-1"}),
        ("shipment", {"carrier": "DHL", "tracking_number": "T-1"}),
        ("delivery", None),
    ],
    [("cancellation", {"reason": "changed mind"})],
]

# Built on a store it never opens (that happens at start-up), only to read its schema.
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


class Target:
    """The app under test, its admin key, and orders in every state to aim commands at."""

    def __init__(self, database_url: str) -> None:
        self.admin = bearer(issue_key(database_url, Role.admin, "schemathesis"))
        # Effects are not delivered: their receivers are not the API under test.
        self.app: FastAPI = create_app(Settings(database_url=database_url, run_effects=False))
        self.order_ids = itertools.cycle(self._place_orders())
        self.sent = itertools.count()

    def _place_orders(self) -> list[str]:
        """One order per state (Schemathesis' client starts the app's lifespan)."""
        order_ids = []
        with get_client(self.app) as client:
            client.headers.update(self.admin)
            for steps in LIFECYCLES:
                placed = client.post("/orders", json=order_body())
                assert placed.status_code == 201, placed.text
                order_id = placed.json()["order_id"]
                for suffix, body in steps:
                    done = client.post(f"/orders/{order_id}/{suffix}", json=body)
                    assert done.status_code == 200, done.text
                order_ids.append(order_id)
        return order_ids

    def check(self, case: schemathesis.Case) -> None:
        """Send the case (three in four aimed at a real order) and check the answer."""
        if "order_id" in case.path_parameters and next(self.sent) % 4:
            case.path_parameters["order_id"] = next(self.order_ids)
        case.call_and_validate(checks=CHECKS, app=self.app, headers=self.admin)


def bounded(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The app on a fresh SQLite file, its lifespan stopped at the end."""
    database = tmp_path_factory.mktemp("schemathesis") / "store.db"
    try:
        yield Target(f"sqlite:///{database}")
    finally:
        shutdown_lifespans()


@schema.parametrize()
@bounded(EXAMPLES_PER_OPERATION)
def test_every_operation_keeps_its_contract(target: Target, case: schemathesis.Case) -> None:
    """Whatever Schemathesis sends, the answer is documented and never a server error."""
    target.check(case)


@pytest.mark.postgres
def test_every_operation_keeps_its_contract_on_postgres(postgres_url: str) -> None:
    """The same checks, fewer examples, on PostgreSQL (which refuses more than SQLite does)."""
    target = Target(postgres_url)
    try:
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @bounded(EXAMPLES_PER_OPERATION_ON_POSTGRES)
            def check(case: schemathesis.Case) -> None:
                target.check(case)

            check()
    finally:
        shutdown_lifespans()
