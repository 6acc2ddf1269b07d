"""/healthz and /readyz say up or down, and only whether this process can serve."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api.http.app import create_app
from api.settings import Settings
from tests.support.http import order_body
from tests.support.stores import open_ledger_at


def idle_app(database_url: str) -> TestClient:
    """An app running no projection worker, so its read models stay where they are."""
    return TestClient(create_app(Settings(database_url=database_url, run_projections=False)))


class TestReadiness:
    def test_probes_without_a_key_say_up_and_nothing_more(
        self, sqlite_url: str, client: TestClient
    ) -> None:
        """No position (order volume), no projection names, no counts."""
        client.post("/orders", json=order_body())
        with TestClient(create_app(Settings(database_url=sqlite_url))) as anonymous:
            assert anonymous.get("/healthz").json() == {"status": "ok"}
            assert anonymous.get("/readyz").json() == {"status": "ready"}

    def test_projections_far_behind_leave_the_process_ready(self, sqlite_url: str) -> None:
        """Lag is the deployment's state, not this process's: GET /projections shows it."""
        ledger = open_ledger_at(sqlite_url)
        try:
            for _ in range(3):
                ledger.place_order(**order_body())
        finally:
            ledger.close()
        with idle_app(sqlite_url) as idle:
            response = idle.get("/readyz")
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "ready"}
