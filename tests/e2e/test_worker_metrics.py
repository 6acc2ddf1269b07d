"""`orderledger worker --metrics-port`: a worker process's delivery counters and lag, scraped.

The worker runs as its own process, as on a worker machine; a real receiver on loopback takes
the webhooks, and Prometheus text is read over HTTP from the port the worker reports.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import httpx
import pytest

from projections.effects.service import Effects
from projections.engine.runtime import ProjectionRuntime
from tests.e2e.conftest import Deploy
from tests.support.http import order_body
from tests.support.processes import Process
from tests.support.receivers import LOCAL_TARGETS, WebhookReceiver
from tests.support.stores import open_ledger_at

ANNOUNCED = re.compile(r"metrics at (http://\S+/metrics)")


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None when it is absent."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        base, _, label_text = metric.partition("{")
        have = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if base == name and have == wanted:
            return float(value)
    return None


@pytest.fixture
def worker(sqlite_url: str, deploy: Deploy) -> tuple[Process, str]:
    """`orderledger worker --metrics-port 0` on the store; the process and its metrics URL."""
    deployment = deploy(
        sqlite_url,
        effect_backoff_base=0.01,
        effect_backoff_cap=0.05,
        effect_max_attempts=2,
        projection_poll_interval=0.01,
        projection_idle_wait=0.05,
    )
    process = deployment.worker("worker", "--metrics-port", "0")
    found = ANNOUNCED.search(process.output())
    assert found is not None, process.output()
    return process, found.group(1)


def scrape_until(url: str, ready: Callable[[str], bool], timeout: float = 30) -> str:
    """The worker's metrics once ``ready`` accepts them."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(url, timeout=5).text
        if ready(text):
            return text
        time.sleep(0.1)
    pytest.fail(f"metrics never showed the expected values:\n{text}")


def test_a_worker_exposes_its_delivery_counters_and_projection_lag(
    sqlite_url: str,
    receiver: WebhookReceiver,
    worker: tuple[Process, str],
) -> None:
    process, url = worker
    ledger = open_ledger_at(sqlite_url)
    runtime = ProjectionRuntime.open(ledger, sqlite_url)
    try:
        Effects(runtime.engine, runtime.source, LOCAL_TARGETS).add_subscription(
            receiver.url, ["OrderPlaced"]
        )
        for _ in range(3):
            ledger.place_order(**order_body())
        head = ledger.head_position()
    finally:
        runtime.close()
        ledger.close()

    def delivered_all(text: str) -> bool:
        """Every webhook sent by this process, and the store read after the last delivery."""
        attempts = sample(
            text, "orderledger_effect_attempts_total", kind="webhook", outcome="delivered"
        )
        outbox = sample(text, "orderledger_outbox_effects", status="delivered")
        return attempts == 3 and outbox == 3

    text = scrape_until(url, delivered_all)
    assert sample(text, "orderledger_store_up") == 1
    for projection in ("order_summaries", "outbox"):
        assert sample(text, "orderledger_projection_head", projection=projection) == head
        assert sample(text, "orderledger_projection_position", projection=projection) == head
        assert sample(text, "orderledger_projection_lag_events", projection=projection) == 0
    assert len(receiver.accepted_ids()) == 3
    assert process.terminate() == 0
