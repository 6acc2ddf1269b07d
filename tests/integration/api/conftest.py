"""The app built on a real store, driven through its ASGI interface, authenticated as admin."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from api.http.app import create_app
from api.key_store import Role
from api.settings import Settings
from tests import LOCAL_RECEIVERS
from tests.support.auth import bearer, issue_key
from tests.support.http import order_body

# Starlette would rather its test client ran on httpx2; httpx is what the project installs.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient


def _admin_client(database_url: str) -> Iterator[TestClient]:
    """The app on ``database_url``, every request sending an admin key made before start-up."""
    headers = bearer(issue_key(database_url, Role.admin, "test admin"))
    settings = Settings(database_url=database_url, webhook_allowed_networks=LOCAL_RECEIVERS)
    with TestClient(create_app(settings), headers=headers) as client:
        yield client


@pytest.fixture
def client(sqlite_url: str) -> Iterator[TestClient]:
    """The app on a fresh SQLite file, started and shut down around the test; sends an admin key."""
    yield from _admin_client(sqlite_url)


@pytest.fixture
def store_client(store_url: str) -> Iterator[TestClient]:
    """The app on a fresh SQLite file or PostgreSQL database; sends an admin key."""
    yield from _admin_client(store_url)


def _database_url(client: TestClient) -> str:
    return str(client.app.state.settings.database_url)  # type: ignore[attr-defined]


@pytest.fixture
def api_key(client: TestClient) -> Callable[[Role], str]:
    """Create a key with a role in the client's store and return its token."""

    def create(role: Role) -> str:
        return issue_key(_database_url(client), Role(role), f"test {role}")

    return create


@pytest.fixture
def auth_headers(api_key: Callable[[Role], str]) -> Callable[[Role], dict[str, str]]:
    """Headers authenticating a request with a new key of a role, e.g. auth_headers("reader")."""

    def headers(role: Role) -> dict[str, str]:
        return bearer(api_key(role))

    return headers


@pytest.fixture
def place_order(client: TestClient) -> Callable[..., str]:
    """Place a valid order (with overrides) and return its id."""

    def place(**overrides: Any) -> str:
        response = client.post("/orders", json=order_body(**overrides))
        assert response.status_code == 201, response.text
        return str(response.json()["order_id"])

    return place
