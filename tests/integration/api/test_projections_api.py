"""Projection status and rebuilds over HTTP, with reads answering throughout."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.http.app import create_app
from api.settings import Settings
from projections.engine.catalog import generations
from projections.engine.database import write_transaction
from projections.engine.processor import ProcessorSettings
from projections.registry import all_projections
from tests.support.auth import bearer, issue_key
from tests.support.http import assert_problem, head_position, order_body

NAMES = {"order_summaries", "customer_stats", "daily_sales", "sku_sales", "outbox", "audit_log"}
VERSIONS = {projection.name: projection.version for projection in all_projections()}
PATIENCE = 60.0
"""How long a test waits for the in-process worker before failing (a bound, not a measure)."""


def start(url: str, **settings: Any) -> TestClient:
    """A client on the app over ``url``; used as a context manager so the lifespan runs."""
    return TestClient(
        create_app(Settings(database_url=url, read_your_writes_timeout=PATIENCE, **settings)),
        headers=bearer(issue_key(url)),
    )


@pytest.fixture
def live(sqlite_url: str) -> Iterator[TestClient]:
    """The app on a SQLite file, its worker applying small batches in-process."""
    with start(sqlite_url, projection_batch_size=5) as client:
        yield client


@pytest.fixture
def idle(sqlite_url: str) -> Iterator[TestClient]:
    """The app on a SQLite file with no worker: projections move only when the test says."""
    with start(sqlite_url, run_projections=False) as client:
        yield client


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def place_orders(client: TestClient, count: int) -> list[str]:
    """Orders for a few customers, some paid and some cancelled, so every projection has rows."""
    ids = []
    for n in range(count):
        placed = client.post("/orders", json=order_body(customer_id=f"cust-{n % 3}"))
        assert placed.status_code == 201, placed.text
        order_id = str(placed.json()["order_id"])
        if n % 3 == 1:
            body = {"amount": 3000, "payment_reference": f"pay-{n}"}
            ok(client.post(f"/orders/{order_id}/payments", json=body))
        if n % 3 == 2:
            ok(client.post(f"/orders/{order_id}/cancellation", json={"reason": "no longer"}))
        ids.append(order_id)
    return ids


def wait_for_every_read_model(client: TestClient, position: int) -> None:
    """One read per projection at ``position``: each answers once its projection applied it."""
    at = {"min_position": position}
    ok(client.get("/orders", params=at))
    ok(client.get("/customers/cust-0", params=at))
    ok(client.get("/reports/top-skus", params=at))
    ok(client.get("/reports/daily-sales", params={**at, "from": "2000-01-01", "to": "2000-01-01"}))


def summaries(client: TestClient, ids: list[str]) -> dict[str, Any]:
    return {order_id: ok(client.get(f"/orders/{order_id}")) for order_id in ids}


class TestProjectionStatus:
    """What /projections says about each read model."""

    def test_every_projection_is_live_at_the_head_after_catch_up(self, live: TestClient) -> None:
        """Every projection lists as live, at the head, from their first generation."""
        place_orders(live, 6)
        head = head_position(live)
        wait_for_every_read_model(live, head)

        listed = ok(live.get("/projections"))["data"]
        assert {p["name"] for p in listed} == NAMES
        for projection in listed:
            assert projection["state"] == "live", projection
            assert (projection["position"], projection["head"]) == (head, head)
            assert (projection["lag_events"], projection["lag_seconds"]) == (0, 0.0)
            assert projection["serving_generation"] == 1
            assert projection["version"] == VERSIONS[projection["name"]]
            assert projection["last_error"] is None
            assert projection["rebuild"] is None
            assert projection["lease_owner"]
            one = ok(live.get(f"/projections/{projection['name']}"))
            assert {k: v for k, v in one.items() if k != "updated_at"} == {
                k: v for k, v in projection.items() if k != "updated_at"
            }

    def test_a_projection_behind_the_head_shows_its_lag(self, idle: TestClient) -> None:
        """With no worker, status reports how many events each projection has still to apply."""
        place_orders(idle, 2)
        assert {p["state"] for p in ok(idle.get("/projections"))["data"]} == {"not_started"}
        idle.app.state.projections.worker().run_until_caught_up(timeout=PATIENCE)
        reached = head_position(idle)
        place_orders(idle, 2)
        head = head_position(idle)
        for projection in ok(idle.get("/projections"))["data"]:
            assert (projection["position"], projection["head"]) == (reached, head)
            assert projection["lag_events"] == head - reached
            assert projection["state"] in ("live", "catching_up")

    def test_an_unknown_projection_is_a_404_problem(self, live: TestClient) -> None:
        """Reading or rebuilding a projection that does not exist names the known ones."""
        for response in (live.get("/projections/orders"), live.post("/projections/orders/rebuild")):
            problem = assert_problem(response, 404, "not-found")
            assert "orders" in problem["detail"]
            assert all(name in problem["detail"] for name in NAMES)


class TestRebuild:
    """POST /projections/{name}/rebuild builds a new generation while the old one serves."""

    def test_a_store_of_a_newer_version_is_a_409_problem_and_status_says_refused(
        self, idle: TestClient
    ) -> None:
        """Code older than the serving generation (a rolling upgrade) refuses to rebuild it."""
        place_orders(idle, 2)
        runtime = idle.app.state.projections
        runtime.worker(["order_summaries"]).run_until_caught_up(timeout=PATIENCE)
        with write_transaction(runtime.engine) as conn:
            conn.execute(
                update(generations)
                .where(generations.c.name == "order_summaries")
                .values(version=generations.c.version + 1)
            )

        problem = assert_problem(idle.post("/projections/order_summaries/rebuild"), 409)

        assert "store has version 2, this worker runs 1" in problem["detail"]
        status = ok(idle.get("/projections/order_summaries"))
        assert status["state"] == "refused"
        assert status["refused"] == "refused: store has version 2, this worker runs 1"
        assert [g.version for g in runtime.catalog.rows("order_summaries")] == [2]

    def test_polling_shows_the_rebuild_progress_then_the_new_generation(
        self, idle: TestClient
    ) -> None:
        """Stepping a worker by small batches: the status moves from rebuilding to live."""
        ids = place_orders(idle, 6)
        runtime = idle.app.state.projections
        runtime.worker().run_until_caught_up(timeout=PATIENCE)
        head = head_position(idle)
        before = summaries(idle, ids)

        accepted = idle.post("/projections/order_summaries/rebuild")
        assert accepted.status_code == 202, accepted.text
        body = accepted.json()
        assert (body["name"], body["generation"]) == ("order_summaries", 2)
        assert accepted.headers["Location"] == body["status_url"] == "/projections/order_summaries"

        status = ok(idle.get(accepted.headers["Location"]))
        assert (status["state"], status["serving_generation"]) == ("rebuilding", 1)
        assert status["rebuild"]["generation"] == 2
        assert (status["rebuild"]["position"], status["rebuild"]["head"]) == (0, head)
        assert summaries(idle, ids) == before

        worker = runtime.worker(only=["order_summaries"], settings=ProcessorSettings(batch_size=3))
        progress = []
        try:
            while status["serving_generation"] == 1:
                worker.run_once()
                assert summaries(idle, ids) == before
                status = ok(idle.get(accepted.headers["Location"]))
                if status["rebuild"] is not None:
                    progress.append(status["rebuild"]["position"])
        finally:
            worker.release_all()

        assert progress == sorted(progress)
        assert any(0 < position < head for position in progress)
        assert (status["serving_generation"], status["state"]) == (2, "live")
        assert (status["position"], status["rebuild"]) == (head, None)
        assert summaries(idle, ids) == before

    def test_reads_keep_answering_while_the_worker_rebuilds(self, live: TestClient) -> None:
        """Reading orders in a loop during a rebuild always gets them, right, until it is done."""
        ids = place_orders(live, 12)
        head = head_position(live)
        wait_for_every_read_model(live, head)
        before = summaries(live, ids)

        accepted = live.post("/projections/order_summaries/rebuild")
        assert accepted.status_code == 202, accepted.text
        generation = accepted.json()["generation"]
        assert generation == 2

        deadline = time.monotonic() + PATIENCE
        reads = 0
        while True:
            order_id = ids[reads % len(ids)]
            assert ok(live.get(f"/orders/{order_id}")) == before[order_id]
            reads += 1
            status = ok(live.get(accepted.headers["Location"]))
            if status["serving_generation"] == generation and status["state"] == "live":
                break
            assert time.monotonic() < deadline, f"rebuild did not finish: {status}"

        assert (status["position"], status["rebuild"]) == (head, None)
        assert summaries(live, ids) == before
        page = ok(live.get("/orders", params={"limit": 200}))
        assert {o["order_id"]: o for o in page["data"]} == before

    def test_asking_again_returns_the_rebuild_in_progress_unless_restarted(
        self, idle: TestClient
    ) -> None:
        """A second request joins the running rebuild; restart=true begins a new generation."""
        idle.app.state.projections.worker().run_until_caught_up(timeout=PATIENCE)
        first = idle.post("/projections/sku_sales/rebuild")
        again = idle.post("/projections/sku_sales/rebuild")
        assert first.status_code == again.status_code == 202
        assert again.json()["generation"] == first.json()["generation"]
        restarted = idle.post("/projections/sku_sales/rebuild", params={"restart": "true"})
        assert restarted.status_code == 202
        assert restarted.json()["generation"] > first.json()["generation"]
        status = ok(idle.get("/projections/sku_sales"))
        assert status["rebuild"]["generation"] == restarted.json()["generation"]
        assert status["serving_generation"] == 1


class TestOnEveryStore:
    """Status and rebuild behave the same on SQLite and PostgreSQL."""

    def test_a_rebuild_takes_over_and_every_projection_ends_live(self, store_url: str) -> None:
        """After catch-up all are live at the head; a rebuild replaces the serving generation."""
        with start(store_url, projection_batch_size=5) as client:
            ids = place_orders(client, 6)
            head = head_position(client)
            wait_for_every_read_model(client, head)
            before = summaries(client, ids)
            listed = ok(client.get("/projections"))["data"]
            assert {(p["name"], p["state"], p["position"]) for p in listed} == {
                (name, "live", head) for name in NAMES
            }

            accepted = client.post("/projections/customer_stats/rebuild")
            assert accepted.status_code == 202, accepted.text
            deadline = time.monotonic() + PATIENCE
            while True:
                assert summaries(client, ids) == before
                assert ok(client.get("/customers/cust-1"))["orders"] == 2
                status = ok(client.get(accepted.headers["Location"]))
                if status["serving_generation"] == accepted.json()["generation"]:
                    break
                assert time.monotonic() < deadline, f"rebuild did not finish: {status}"
            assert (status["state"], status["position"]) == ("live", head)
