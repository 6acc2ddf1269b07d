"""Fixtures of the integration tier: the ledger and the read models on one real store."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from api.bootstrap import open_ledger, open_read_models
from api.settings import Settings
from domain.ledger import OrderLedger
from projections.engine.runtime import ProjectionRuntime


@pytest.fixture
def ledger(store_url: str) -> Iterator[OrderLedger]:
    """The order ledger on a fresh SQLite file or PostgreSQL database."""
    ledger = open_ledger(Settings(database_url=store_url))
    yield ledger
    ledger.close()


@pytest.fixture
def runtime(ledger: OrderLedger, store_url: str) -> Iterator[ProjectionRuntime]:
    """Every registered projection (the outbox included), installed on the empty store."""
    runtime = open_read_models(
        Settings(database_url=store_url, projection_poll_interval=0.02), ledger
    )
    yield runtime
    runtime.close()
