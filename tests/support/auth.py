"""API keys for tests: every client of the app authenticates, as it would in production."""

from __future__ import annotations

from typing import TYPE_CHECKING

from api.key_store import ApiKeyStore, Role

if TYPE_CHECKING:
    from fastapi.testclient import TestClient


def issue_key(database_url: str, role: Role = Role.admin, name: str = "tests") -> str:
    """A new key's token, created in the store at ``database_url`` (the app's event store)."""
    store = ApiKeyStore.from_url(database_url)
    try:
        return store.create(role, name).token
    finally:
        store.close()


def bearer(token: str) -> dict[str, str]:
    """The Authorization header carrying ``token``."""
    return {"Authorization": f"Bearer {token}"}


def admin(database_url: str) -> dict[str, str]:
    """Headers with a new admin key of the store at ``database_url``."""
    return bearer(issue_key(database_url, Role.admin))


def authenticated(client: TestClient, database_url: str, role: Role = Role.admin) -> TestClient:
    """The client, sending a new ``role`` key on every request from now on."""
    client.headers.update(bearer(issue_key(database_url, role)))
    return client
