"""/readyz names each check and each projection, and fails on lag beyond the threshold."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from domain.ledger import OrderLedger
from tests.api import order_body


def idle_app(database_url: str, max_lag: int) -> TestClient:
    """An app running no projection worker, so its read models stay where they are."""
    settings = Settings(
        database_url=database_url, run_projections=False, ready_max_lag_events=max_lag
    )
    return TestClient(create_app(settings))


class TestReadiness:
    def test_each_projection_is_named_in_the_check(self, client: TestClient) -> None:
        """The projections check lists every projection with its state and lag."""
        body = client.get("/readyz").json()
        names = [p["name"] for p in client.get("/projections").json()["data"]]
        detail = body["checks"]["projections"]["detail"]
        assert names
        for name in names:
            assert f"{name} " in detail

    def test_lag_beyond_the_threshold_is_not_ready(self, sqlite_url: str) -> None:
        """Events nobody applies: ready while within ready_max_lag_events, 503 beyond it."""
        ledger = OrderLedger.from_url(sqlite_url)
        try:
            for _ in range(3):
                ledger.place_order(**order_body())
        finally:
            ledger.close()
        with idle_app(sqlite_url, max_lag=1_000) as lenient:
            assert lenient.get("/readyz").status_code == 200
        with idle_app(sqlite_url, max_lag=2) as strict:
            response = strict.get("/readyz")
        assert response.status_code == 503, response.text
        check = response.json()["checks"]["projections"]
        assert check["status"] == "failing"
        assert "3 events behind (more than 2)" in check["detail"]
        assert response.json()["checks"]["store"]["status"] == "ok"
