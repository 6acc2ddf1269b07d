"""Projection workers as real `orderledger worker` processes: leases, takeover, shutdown, status."""

from __future__ import annotations

import re

import pytest

from projections.engine.catalog import SERVING
from tests.e2e.conftest import Deploy
from tests.support.orders import generate_orders
from tests.support.processes import PROCESS_TIMEOUT
from tests.support.stores import (
    all_serving_at,
    generations_by_role,
    opened_store,
    owner_pid,
    store_figures,
    summary_figures,
)

LEASE_TTL = 2.0
TAKEOVER_TIMEOUT = 3 * LEASE_TTL + 30.0
"""Three lease lifetimes, plus slack for a loaded machine."""


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if " ERROR " in line or "Traceback" in line]


@pytest.mark.slow
class TestLeaseTakeover:
    """Two worker processes share the work through leases; a killed one is replaced."""

    def test_the_survivor_takes_over_a_killed_owners_leases_and_applies_each_event_once(
        self, store_url: str, deploy: Deploy
    ) -> None:
        """SIGKILL the lease owner: the other worker takes its leases and reaches the new head."""
        with (
            opened_store(store_url) as (ledger, runtime),
            deploy(
                store_url,
                projection_lease_ttl=LEASE_TTL,
                projection_batch_size=200,
                projection_idle_wait=0.2,
            ) as deployment,
        ):
            names = [p.name for p in runtime.projections]
            head = generate_orders(ledger, events=3000, seed=101)
            workers = {
                process.pid: process
                for process in (
                    deployment.start("worker"),
                    deployment.start("worker"),
                )
            }

            def caught_up_and_owned(target: int) -> bool:
                serving = generations_by_role(runtime, SERVING)
                owned = all(owner_pid(row) is not None for row in serving.values())
                return owned and all_serving_at(runtime, names, target)

            deployment.wait_for(
                lambda: caught_up_and_owned(head),
                "both workers caught up and every serving generation has an owner",
                watch=list(workers.values()),
            )
            serving = generations_by_role(runtime, SERVING)
            assert sorted(serving) == sorted(names)
            for row in serving.values():
                assert owner_pid(row) in workers, f"{row.name} is owned by {row.lease_owner}"

            victim = workers.pop(owner_pid(serving["order_summaries"]) or 0)
            [survivor] = workers.values()
            victim.kill()
            new_head = generate_orders(ledger, events=2000, seed=102)
            assert new_head > head

            def all_owned_by_survivor() -> bool:
                rows = generations_by_role(runtime, SERVING).values()
                return all(owner_pid(row) == survivor.pid for row in rows)

            deployment.wait_for(
                all_owned_by_survivor,
                "the surviving worker holds every serving generation's lease",
                timeout=TAKEOVER_TIMEOUT,
                watch=[survivor],
            )
            deployment.wait_for(
                lambda: all_serving_at(runtime, names, new_head),
                "the surviving worker brought every projection to the new head",
                watch=[survivor],
            )

            assert summary_figures(runtime) == store_figures(ledger)
            assert _error_lines(survivor.output()) == []


class TestWorkerLifecycle:
    """A worker catches up, reports live, and gives its leases back when told to stop."""

    def test_a_stopped_worker_leaves_every_projection_at_the_head_and_its_leases_free(
        self, store_url: str, deploy: Deploy
    ) -> None:
        """SIGTERM after catch-up: exit code 0, read models equal the store, no lease held."""
        with (
            opened_store(store_url) as (ledger, runtime),
            deploy(store_url, projection_lease_ttl=LEASE_TTL) as deployment,
        ):
            names = [p.name for p in runtime.projections]
            head = generate_orders(ledger, events=1500, seed=201)
            worker = deployment.start("worker")
            deployment.wait_for(
                lambda: all_serving_at(runtime, names, head),
                "the worker caught up",
                watch=[worker],
            )

            assert deployment.terminate(worker) == 0, worker.output()
            rows = runtime.catalog.rows()
            assert sorted(row.name for row in rows) == sorted(names)
            assert [row.lease_owner for row in rows] == [None] * len(rows)
            assert summary_figures(runtime) == store_figures(ledger)
            assert _error_lines(worker.output()) == []

    def test_status_shows_not_started_before_a_worker_and_live_after_its_catch_up(
        self, store_url: str, deploy: Deploy
    ) -> None:
        """`orderledger status` names every projection with its state and position."""
        with (
            opened_store(store_url) as (ledger, runtime),
            deploy(store_url, projection_lease_ttl=LEASE_TTL) as deployment,
        ):
            names = [p.name for p in runtime.projections]
            head = generate_orders(ledger, events=600, seed=301)

            before = _states(deployment.run("status"), names)
            assert before == {name: "not_started" for name in names}

            worker = deployment.start("worker")
            try:
                deployment.wait_for(
                    lambda: all_serving_at(runtime, names, head),
                    "the worker caught up",
                    watch=[worker],
                )
                output = deployment.run("status", timeout=PROCESS_TIMEOUT)
            finally:
                deployment.terminate(worker)

            assert _states(output, names) == {name: "live" for name in names}
            for name in names:
                [line] = [line for line in output.splitlines() if f" {name} " in line]
                assert str(head) in line.split(), f"{name} does not show the head {head}: {line}"


def _states(output: str, names: list[str]) -> dict[str, str]:
    """Each projection's state word from the status table (loosely: its row's state column)."""
    states = {}
    for name in names:
        rows = [line for line in output.splitlines() if f" {name} " in line]
        assert len(rows) == 1, f"expected one row for {name} in:\n{output}"
        found = re.findall(r"\b(live|catching_up|rebuilding|failed|stalled|not_started)\b", rows[0])
        assert len(found) == 1, f"expected one state for {name} in: {rows[0]}"
        states[name] = found[0]
    return states
