"""`orderledger serve --workers 2` as a real process tree on a random loopback port.

Two API processes answer, one projection worker beside them keeps the read models live, /metrics
sums both processes' counters, and no child outlives serve, whether it is stopped or killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.key_store import Role
from tests.support.auth import bearer, issue_key
from tests.support.cli_processes import REPO_ROOT, cli_env
from tests.support.ports import free_port
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


def _json_line(line: str) -> dict[str, Any]:
    try:
        parsed: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError:
        pytest.fail(f"a log line is not JSON: {line!r}")
    return parsed


@dataclass
class Serving:
    """A running `serve --workers 2` with an admin key, its stderr in a file."""

    process: subprocess.Popen[bytes]
    base_url: str
    token: str
    stderr_path: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=bearer(self.token), timeout=30)

    def log_lines(self) -> list[dict[str, Any]]:
        """Every stderr line, each of which must be one JSON object."""
        text = self.stderr_path.read_text(errors="replace")
        complete = text.split("\n")[:-1]  # the last piece may be a line still being written
        return [_json_line(line) for line in complete if line.strip()]

    def requests_logged(self, route: str, method: str) -> list[dict[str, Any]]:
        return [
            line
            for line in self.log_lines()
            if line["logger"] == "orderledger.http"
            and line.get("route") == route
            and line.get("method") == method
        ]


@contextmanager
def serve(store_url: str, tmp_path: Path, *args: str) -> Iterator[Serving]:
    """`orderledger serve ARGS` on the store, answering /healthz; killed at the end if still up."""
    token = issue_key(store_url, Role.admin, "serve-workers")
    port = free_port()
    env = cli_env(
        database_url=store_url,
        host="127.0.0.1",
        port=port,
        projection_poll_interval=0.01,
        projection_idle_wait=0.05,
    )
    stderr_path = tmp_path / "serve.stderr.log"
    with stderr_path.open("wb") as err, (tmp_path / "serve.stdout.log").open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli.main", "serve", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=err,
        )
    served = Serving(process, f"http://127.0.0.1:{port}", token, stderr_path)
    children: set[int] = set()
    try:

        def healthy() -> bool:
            assert process.poll() is None, stderr_path.read_text()
            try:
                return httpx.get(f"{served.base_url}/healthz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, "serve to answer /healthz", timeout=START_TIMEOUT)
        children = descendants(process.pid)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
        for pid in children | descendants(process.pid):
            if running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def serving(store_url: str, tmp_path: Path) -> Iterator[Serving]:
    """`orderledger serve --workers 2` on the store."""
    with serve(store_url, tmp_path, "--workers", "2") as served:
        yield served


def started_children(serving: Serving) -> set[int]:
    """Serve's children once the two API processes and the projection worker have started."""

    def found() -> set[int] | None:
        children = descendants(serving.process.pid)
        return children if len(children) >= 3 else None

    children: set[int] = wait_for(
        found, "two API processes and the projection worker", timeout=START_TIMEOUT
    )

    def both_started() -> bool:
        lines = serving.log_lines()
        started = {
            line["pid"] for line in lines if line["message"] == "Application startup complete."
        }
        return len(started) == 2

    wait_for(both_started, "both API processes to finish starting", timeout=START_TIMEOUT)
    return children


def place_orders(serving: Serving, count: int) -> list[tuple[str, int]]:
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
        self, serving: Serving
    ) -> None:
        """Both processes answer, reads see their writes, /metrics counts both, SIGTERM ends all."""
        children = started_children(serving)

        # Commands succeed on both processes (fresh connections spread across them).
        placed: list[tuple[str, int]] = []
        while len(placed) < 200:
            placed += place_orders(serving, 16)
            api_pids = {line["pid"] for line in serving.requests_logged("/orders", "POST")}
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
        lines = serving.log_lines()
        assert not [line for line in lines if line["logger"] == "uvicorn.access"]
        assert any(line["logger"] == "uvicorn.error" for line in lines)

        serving.process.send_signal(signal.SIGTERM)
        assert serving.process.wait(STOP_TIMEOUT) == 0
        wait_for(
            lambda: not [pid for pid in children if running(pid)],
            "every child to exit with serve",
            timeout=STOP_TIMEOUT,
        )


class TestSingleProcess:
    def test_sigterm_ends_serve_with_exit_code_zero(self, sqlite_url: str, tmp_path: Path) -> None:
        """One process: a graceful shutdown, then a normal exit rather than death by signal."""
        with serve(sqlite_url, tmp_path) as served:
            with served.client() as http:
                assert http.post("/orders", json=ORDER).status_code == 201
            served.process.send_signal(signal.SIGTERM)
            assert served.process.wait(STOP_TIMEOUT) == 0
        messages = [line["message"] for line in served.log_lines()]
        assert "Application shutdown complete." in messages


class TestOrphans:
    @pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
    def test_a_sigkilled_serve_leaves_no_child_running(self, serving: Serving) -> None:
        """The API processes and the projection worker notice their parent is gone and exit."""
        children = started_children(serving)
        serving.process.send_signal(signal.SIGKILL)
        serving.process.wait(STOP_TIMEOUT)
        wait_for(
            lambda: not [pid for pid in children if running(pid)],
            "every orphaned child to exit",
            timeout=STOP_TIMEOUT,
        )
