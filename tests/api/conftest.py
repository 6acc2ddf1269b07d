"""The app built on a real store, driven through its ASGI interface."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from api.app import create_app
from api.settings import Settings
from tests.api import order_body

# Starlette would rather its test client ran on httpx2; httpx is what the project installs.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient


@pytest.fixture
def client(sqlite_url: str) -> Iterator[TestClient]:
    """The app on a fresh SQLite file, started and shut down around the test."""
    with TestClient(create_app(Settings(database_url=sqlite_url))) as client:
        yield client


@pytest.fixture
def store_client(store_url: str) -> Iterator[TestClient]:
    """The app on a fresh SQLite file or PostgreSQL database."""
    with TestClient(create_app(Settings(database_url=store_url))) as client:
        yield client


@pytest.fixture
def place_order(client: TestClient) -> Callable[..., str]:
    """Place a valid order (with overrides) and return its id."""

    def place(**overrides: Any) -> str:
        response = client.post("/orders", json=order_body(**overrides))
        assert response.status_code == 201, response.text
        return str(response.json()["order_id"])

    return place
