"""`orderledger serve --workers 2` as a real process tree on a random loopback port.

Two API processes answer, one projection worker beside them keeps the read models live, /metrics
sums both processes' counters, and no child outlives serve, whether it is stopped or killed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Deploy
from tests.support.processes import Server
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
ORDER = {
    "customer_id": "cust-workers",
    "currency": "EUR",
    "lines": [{"sku": "SKU-1", "quantity": 1, "unit_price": 1000}],
}


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, read from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] not in ("Z", "X"):
            parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.fixture
def serving(store_url: str, deploy: Deploy) -> Server:
    """`orderledger serve --workers 2` on the store, with an admin key."""
    deployment = deploy(store_url, projection_poll_interval=0.01, projection_idle_wait=0.05)
    return deployment.serve("serve", "--workers", "2")


def requests_logged(server: Server, route: str, method: str) -> list[dict[str, Any]]:
    return [
        line
        for line in server.log_records()
        if line["logger"] == "orderledger.http"
        and line.get("route") == route
        and line.get("method") == method
    ]


def started_children(serving: Server) -> set[int]:
    """Serve's children once the two API processes and the projection worker have started."""

    def found() -> set[int] | None:
        children = descendants(serving.pid)
        return children if len(children) >= 3 else None

    children: set[int] = wait_for(
        found, "two API processes and the projection worker", timeout=START_TIMEOUT
    )

    def both_started() -> bool:
        lines = serving.log_records()
        started = {
            line["pid"] for line in lines if line["message"] == "Application startup complete."
        }
        return len(started) == 2

    wait_for(both_started, "both API processes to finish starting", timeout=START_TIMEOUT)
    return children


def place_orders(serving: Server, count: int) -> list[tuple[str, int]]:
    """Place orders from 8 threads, each on a fresh connection so both processes get some."""

    def place(_: int) -> tuple[str, int]:
        with serving.client() as http:
            response = http.post("/orders", json=ORDER)
        assert response.status_code == 201, response.text
        body = response.json()
        return str(body["order_id"]), int(body["position"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(place, range(count)))


def metric(text: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


class TestServeWorkers:
    def test_two_api_processes_one_projection_worker_and_summed_metrics(
        self, serving: Server
    ) -> None:
        """Both processes answer, reads see their writes, /metrics counts both, SIGTERM ends all."""
        children = started_children(serving)

        # Commands succeed on both processes (fresh connections spread across them).
        placed: list[tuple[str, int]] = []
        while len(placed) < 200:
            placed += place_orders(serving, 16)
            api_pids = {line["pid"] for line in requests_logged(serving, "/orders", "POST")}
            if len(api_pids) == 2:
                break
        assert len(api_pids) == 2, f"only {api_pids} answered {len(placed)} orders"
        assert api_pids <= children

        with serving.client() as http:
            # Read-your-writes: the one projection worker brings each order into the read model.
            for order_id, position in placed:
                read = http.get(f"/orders/{order_id}", params={"min_position": position})
                assert read.status_code == 200, read.text
                assert read.json()["order_id"] == order_id

            # The projections are leased by one process, and it is not an API process.
            projections = http.get("/projections").json()["data"]
            owners = {p["lease_owner"] for p in projections}
            assert len(owners) == 1, owners
            worker_pid = int(next(iter(owners)).split(":")[-2])
            assert worker_pid in children
            assert worker_pid not in api_pids

            # /metrics sums both processes' counters, whichever process answers the scrape.
            for _ in range(4):
                text = http.get("/metrics").text
                posted = metric(
                    text,
                    "orderledger_http_requests_total",
                    route="/orders",
                    method="POST",
                    status="201",
                )
                assert posted == len(placed)
                placed_ok = metric(
                    text, "orderledger_commands_total", command="place_order", outcome="ok"
                )
                assert placed_ok == len(placed)

        # Every line on stderr is JSON; uvicorn's access log is off, its own lines are JSON too.
        lines = serving.log_records()
        assert not [line for line in lines if line["logger"] == "uvicorn.access"]
        assert any(line["logger"] == "uvicorn.error" for line in lines)

        assert serving.terminate() == 0
        wait_for(
            lambda: not [pid for pid in children if running(pid)],
            "every child to exit with serve",
            timeout=STOP_TIMEOUT,
        )


class TestSingleProcess:
    def test_sigterm_ends_serve_with_exit_code_zero(self, sqlite_url: str, deploy: Deploy) -> None:
        """One process: a graceful shutdown, then a normal exit rather than death by signal."""
        served = deploy(sqlite_url).serve()
        with served.client() as http:
            assert http.post("/orders", json=ORDER).status_code == 201
        assert served.terminate() == 0
        messages = [line["message"] for line in served.log_records()]
        assert "Application shutdown complete." in messages


class TestOrphans:
    @pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
    def test_a_sigkilled_serve_leaves_no_child_running(self, serving: Server) -> None:
        """The API processes and the projection worker notice their parent is gone and exit."""
        children = started_children(serving)
        serving.kill()
        wait_for(
            lambda: not [pid for pid in children if running(pid)],
            "every orphaned child to exit",
            timeout=STOP_TIMEOUT,
        )
