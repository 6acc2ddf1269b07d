"""The README's two-machine deployment on PostgreSQL, simulated on loopback.

Two API processes (as behind a load balancer, projections off) and one `orderledger worker`
(as on a worker machine), all on one database. The worker is SIGKILLed and replaced; the read
models catch up with nothing lost and nothing twice. Then the worker is upgraded the graceful
way: SIGTERM hands its leases over at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.support.processes import Deployment, Process, Server
from tests.support.shop import MIN_POSITION, Shop

LEASE_TTL = 2
"""Seconds before a SIGKILLed worker's leases may be taken over (kept short for the test)."""

LONG_LEASE_TTL = 60
"""A lease long enough that a successor taking over well before it must have been handed it."""


def all_orders(http: httpx.Client, min_position: int, **filters: str) -> list[dict[str, Any]]:
    """Every order the read model lists, page after page, once it has reached min_position."""
    response = http.get(
        "/orders", params={"limit": 50, **filters}, headers={MIN_POSITION: str(min_position)}
    )
    orders: list[dict[str, Any]] = []
    while True:
        assert response.status_code == 200, response.text
        page = response.json()
        orders += page["data"]
        if page["next"] is None:
            return orders
        response = http.get(page["next"])


def place_through(server: Server, customer_id: str, count: int) -> dict[str, int]:
    """Place ``count`` orders through one API; their ids and positions."""
    with server.client() as http:
        shop = Shop(http)
        return {shop.place(customer_id=customer_id): shop.position for _ in range(count)}


def reader_caught_up(reader: httpx.Client, position: int) -> Callable[[], bool]:
    """Whether a read at ``position`` through this API answers (not 503) yet."""

    def answered() -> bool:
        response = reader.get("/orders", params={"min_position": position, "limit": 1})
        return response.status_code == 200

    return answered


def all_live_under(reader: httpx.Client, worker: Process, head: int) -> Callable[[], bool]:
    """Whether every projection is live at ``head`` or beyond, its lease held by ``worker``."""

    def holds() -> bool:
        projections = reader.get("/projections").json()["data"]
        return bool(projections) and all(
            p["state"] == "live"
            and p["position"] >= head
            and f":{worker.pid}:" in (p["lease_owner"] or "")
            for p in projections
        )

    return holds


@pytest.mark.slow
@pytest.mark.postgres
def test_two_api_machines_and_a_replaced_worker_share_one_database(
    postgres_deployment: Deployment,
) -> None:
    """Orders placed through both APIs are read through each; a new worker catches up after
    a crash, and takes over at once from a worker stopped for an upgrade."""
    deployment = postgres_deployment
    deployment.settings["projection_lease_ttl"] = LEASE_TTL
    first_worker = deployment.worker("worker-1")
    api_a = deployment.serve("api-a", run_projections=False)
    api_b = deployment.serve("api-b", run_projections=False)

    # Both APIs take orders at once.
    placed: dict[str, dict[str, int]] = {}

    def place(server: Server, customer: str) -> None:
        placed[customer] = place_through(server, customer, 15)

    writers = [
        threading.Thread(target=place, args=(api_a, "cust-a")),
        threading.Thread(target=place, args=(api_b, "cust-b")),
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    assert set(placed) == {"cust-a", "cust-b"}

    # Read-your-writes across machines: each order is read through the other API at its position.
    with api_a.client() as on_a, api_b.client() as on_b:
        for reader, customer in ((on_b, "cust-a"), (on_a, "cust-b")):
            for order_id, position in placed[customer].items():
                response = reader.get(f"/orders/{order_id}", params={"min_position": position})
                assert response.status_code == 200, response.text
                assert response.json()["customer_id"] == customer
        head = max(max(orders.values()) for orders in placed.values())
        everyone = set(placed["cust-a"]) | set(placed["cust-b"])
        for reader in (on_a, on_b):
            assert sorted(o["order_id"] for o in all_orders(reader, head)) == sorted(everyone)

    # The worker machine dies without a word; orders keep coming; a new worker takes over.
    first_worker.kill()
    killed_at = time.monotonic()
    late = place_through(api_a, "cust-a", 10)
    # The successor's own leases are long (see the upgrade below); it starts once the dead
    # worker's have expired, so it takes them at its first attempt.
    time.sleep(max(0.0, killed_at + LEASE_TTL + 0.5 - time.monotonic()))
    second_worker = deployment.worker("worker-2", projection_lease_ttl=LONG_LEASE_TTL)
    late_head = max(late.values())
    with api_a.client() as on_a, api_b.client() as on_b:
        for reader in (on_a, on_b):
            caught_up = reader_caught_up(reader, late_head)
            # Read-your-writes waits for the new worker (a 503 if it takes longer than that).
            deployment.wait_for(caught_up, "the new worker catches up")
            listed = [o["order_id"] for o in all_orders(reader, late_head)]
            assert len(listed) == len(set(listed)) == len(everyone) + len(late)
            assert set(listed) == everyone | set(late)
            stats = reader.get("/customers/cust-a", headers={MIN_POSITION: str(late_head)})
            assert stats.json()["orders"] == 25
            sales = reader.get("/reports/top-skus", headers={MIN_POSITION: str(late_head)})
            units = {row["sku"]: row["units_ordered"] for row in sales.json()["data"]}
            assert units == {"SKU-1": 2 * 40, "SKU-2": 40}

        # Every projection (those no read above waited for too) is advanced by the new worker
        # up to the head, and none is failed.
        deployment.wait_for(
            all_live_under(on_b, second_worker, late_head), "the new worker runs every projection"
        )

        # Upgrading the worker: SIGTERM gives the leases back, so the next worker takes over
        # at once, not after the LONG_LEASE_TTL the stopped one's leases would have lasted.
        assert second_worker.terminate() == 0, second_worker.output()
        stopped_at = time.monotonic()
        third_worker = deployment.worker("worker-3")
        upgraded_head = max(place_through(api_b, "cust-b", 5).values())
        deployment.wait_for(
            all_live_under(on_a, third_worker, upgraded_head),
            "the upgraded worker runs every projection",
            timeout=LONG_LEASE_TTL / 2,
        )
        assert time.monotonic() - stopped_at < LONG_LEASE_TTL / 2
        assert len(all_orders(on_a, upgraded_head)) == len(everyone) + len(late) + 5

    # Every process on every "machine" logged JSON lines only; the APIs one per request.
    for process in deployment.processes:
        records = process.log_records()
        if isinstance(process, Server):
            assert any(record.get("route") == "/orders" for record in records)
