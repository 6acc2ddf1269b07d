"""SIGKILL workers and rebuilds at random moments: read models still equal a clean rebuild."""

from __future__ import annotations

import random
import time

import pytest
from sqlalchemy import inspect

from projections.base import generation_suffix
from projections.engine.catalog import BUILDING, SERVING, Generation
from projections.engine.runtime import ProjectionRuntime
from projections.order_summaries import list_order_summaries
from tests.e2e.conftest import Deploy
from tests.support.orders import generate_orders
from tests.support.processes import Deployment
from tests.support.projections import checksum, run_until_caught_up, table_contents
from tests.support.stores import (
    all_serving_at,
    checksums,
    generations_by_role,
    opened_store,
    owner_pid,
    store_figures,
    summary_figures,
)

EVENTS = 20_000
KILLS = 20
KILL_DELAY = 0.05
"""Longest wait, once past the target, before the kill: the worker catches up thousands of
events per second, so a longer wait lets most kills land after it reached the head."""
SUMMARIES = "order_summaries"


def _serving_position(runtime: ProjectionRuntime, name: str = SUMMARIES) -> int:
    row = runtime.catalog.serving(name)
    return row.position if row is not None else 0


@pytest.mark.slow
class TestWorkerKilledDuringCatchUp:
    """A worker SIGKILLed over and over while catching up loses and repeats nothing."""

    def test_a_worker_killed_at_random_moments_ends_equal_to_a_clean_rebuild(
        self, store_url: str, deploy: Deploy
    ) -> None:
        """20 kills spread over catch-up on 20k events; then every table equals a rebuild."""
        rng = random.Random(20240330)
        with (
            opened_store(store_url) as (ledger, runtime),
            deploy(
                store_url,
                projection_lease_ttl=1.0,
                projection_batch_size=500,
                projection_idle_wait=0.2,
            ) as deployment,
        ):
            names = [p.name for p in runtime.projections]
            head = generate_orders(ledger, events=EVENTS, seed=7)
            targets = sorted(rng.sample(range(1, head), KILLS))

            positions_at_kill = []
            for target in targets:
                worker = deployment.start("worker")

                def working(target: int = target, pid: int = worker.pid) -> bool:
                    rows = runtime.catalog.rows()
                    holds_a_lease = any(owner_pid(row) == pid for row in rows)
                    return holds_a_lease and _serving_position(runtime) >= target

                deployment.wait_for(
                    working,
                    f"the worker holds a lease and passed position {target}",
                    watch=[worker],
                )
                time.sleep(rng.uniform(0.0, KILL_DELAY))
                worker.kill()
                positions_at_kill.append(_serving_position(runtime))

            assert positions_at_kill == sorted(positions_at_kill), "a position went backwards"
            mid_catch_up = [p for p in positions_at_kill if p < head]
            assert len(mid_catch_up) >= KILLS // 2, f"kills landed at {positions_at_kill}"

            worker = deployment.start("worker")
            deployment.wait_for(
                lambda: all_serving_at(runtime, names, head),
                "the last worker brought every projection to the head",
                watch=[worker],
            )
            assert deployment.terminate(worker) == 0, worker.output()
            for row in runtime.catalog.rows():
                assert not row.failed, f"{row.name} stopped: {row.error_message}"

            survived = checksums(runtime)
            before = generations_by_role(runtime, SERVING)
            deployment.run("rebuild", "--all")
            after = generations_by_role(runtime, SERVING)

            assert {n: after[n].generation > before[n].generation for n in names} == dict.fromkeys(
                names, True
            )
            assert {n: after[n].position for n in names} == dict.fromkeys(names, head)
            assert checksums(runtime) == survived
            assert summary_figures(runtime) == store_figures(ledger)


@pytest.mark.slow
class TestWorkerKilledDuringRebuild:
    """A worker SIGKILLed while it builds new generations, up to and around their takeover."""

    def test_generations_rebuilt_under_kills_take_over_equal_to_the_ones_they_replace(
        self, store_url: str, deploy: Deploy
    ) -> None:
        """Kills spread over a rebuild of every projection; the result equals what it replaced."""
        rng = random.Random(20240331)
        with (
            opened_store(store_url) as (ledger, runtime),
            deploy(
                store_url,
                projection_lease_ttl=1.0,
                projection_batch_size=500,
                projection_idle_wait=0.2,
            ) as deployment,
        ):
            names = [p.name for p in runtime.projections]
            head = generate_orders(ledger, events=10_000, seed=17)
            run_until_caught_up(runtime)
            original = checksums(runtime)
            replaced = generations_by_role(runtime, SERVING)
            building = {
                name: runtime.catalog.start_rebuild(name, target=head).generation for name in names
            }
            summaries = building[SUMMARIES]

            still_building_at_kill = []
            for target in sorted(rng.sample(range(1, head), KILLS // 2)):
                worker = deployment.start("worker")

                def working(target: int = target, pid: int = worker.pid) -> bool:
                    rows = runtime.catalog.rows()
                    row = runtime.catalog.row(SUMMARIES, summaries)
                    assert row is not None
                    built = row.role != BUILDING or row.position >= target
                    return built and any(owner_pid(r) == pid for r in rows)

                deployment.wait_for(
                    working,
                    f"the worker holds a lease and built past position {target}",
                    watch=[worker],
                )
                time.sleep(rng.uniform(0.0, KILL_DELAY))
                worker.kill()
                still_building_at_kill.append(
                    any(row.role == BUILDING for row in runtime.catalog.rows())
                )

            assert sum(still_building_at_kill) >= KILLS // 4, still_building_at_kill
            worker = deployment.start("worker")
            deployment.wait_for(
                lambda: all_serving_at(runtime, names, head),
                "every rebuilt generation took over at the head",
                watch=[worker],
            )
            assert deployment.terminate(worker) == 0, worker.output()

            serving = generations_by_role(runtime, SERVING)
            assert {n: serving[n].generation for n in names} == building
            assert checksums(runtime) == original
            leftovers = {
                f"{n}{generation_suffix(replaced[n].generation)}" for n in names
            } & _table_names(runtime)
            assert leftovers == set()
            assert summary_figures(runtime) == store_figures(ledger)


def _live_generations(runtime: ProjectionRuntime) -> list[int]:
    """Generations of order_summaries that still serve or build (not retired or dropped)."""
    rows = runtime.catalog.rows(SUMMARIES)
    return [row.generation for row in rows if row.role in (SERVING, BUILDING)]


def _table_of(generation: int) -> str:
    return f"{SUMMARIES}{generation_suffix(generation)}"


def _table_names(runtime: ProjectionRuntime) -> set[str]:
    return set(inspect(runtime.engine).get_table_names())


def _building(runtime: ProjectionRuntime) -> Generation | None:
    rows = [row for row in runtime.catalog.rows(SUMMARIES) if row.role == BUILDING]
    return rows[0] if rows else None


def _kill_rebuild_midway(
    runtime: ProjectionRuntime, deployment: Deployment, head: int
) -> Generation:
    """Start `rebuild order_summaries`, SIGKILL it between event zero and the head."""
    rebuilding = deployment.start("rebuild", SUMMARIES)

    def midway() -> Generation | None:
        building = _building(runtime)
        return building if building is not None and 0 < building.position < head else None

    deployment.wait_for(midway, "the rebuild is part-way", watch=[rebuilding])
    rebuilding.kill()
    killed = _building(runtime)
    assert killed is not None, "the killed rebuild's generation is gone"
    assert 0 < killed.position < head
    return killed


@pytest.mark.slow
class TestRebuildKilledMidway:
    """A rebuild SIGKILLed part-way leaves serving alone and resumes (or restarts) on request."""

    def test_a_killed_rebuild_leaves_serving_untouched_and_a_second_run_resumes_it(
        self, store_url: str, deploy: Deploy
    ) -> None:
        """The serving generation keeps its rows; the rerun finishes the same generation."""
        with (
            opened_store(store_url) as (ledger, runtime),
            deploy(store_url, projection_lease_ttl=2.0) as deployment,
        ):
            head = generate_orders(ledger, events=EVENTS, seed=11)
            run_until_caught_up(runtime, [SUMMARIES])
            serving = runtime.catalog.serving(SUMMARIES)
            assert serving is not None
            original = checksum(table_contents(runtime, SUMMARIES))

            killed = _kill_rebuild_midway(runtime, deployment, head)

            still = runtime.catalog.serving(SUMMARIES)
            assert still is not None
            assert (still.generation, still.position) == (serving.generation, head)
            assert checksum(table_contents(runtime, SUMMARIES)) == original
            with runtime.reading(SUMMARIES) as (conn, tables):
                assert len(list_order_summaries(conn, tables, limit=5).items) == 5

            output = deployment.run("rebuild", SUMMARIES)

            rebuilt = runtime.catalog.serving(SUMMARIES)
            assert rebuilt is not None
            assert (rebuilt.generation, rebuilt.position) == (killed.generation, head), output
            assert _live_generations(runtime) == [killed.generation]
            assert _table_of(serving.generation) not in _table_names(runtime)
            assert checksum(table_contents(runtime, SUMMARIES)) == original
            assert summary_figures(runtime) == store_figures(ledger)

    def test_rebuild_with_restart_discards_a_killed_rebuild_and_builds_a_new_generation(
        self, store_url: str, deploy: Deploy
    ) -> None:
        """--restart drops the half-built generation and builds the next one from zero."""
        with (
            opened_store(store_url) as (ledger, runtime),
            deploy(store_url, projection_lease_ttl=2.0) as deployment,
        ):
            head = generate_orders(ledger, events=EVENTS, seed=13)
            run_until_caught_up(runtime, [SUMMARIES])
            serving = runtime.catalog.serving(SUMMARIES)
            assert serving is not None
            original = checksum(table_contents(runtime, SUMMARIES))

            killed = _kill_rebuild_midway(runtime, deployment, head)
            deployment.run("rebuild", SUMMARIES, "--restart")

            rebuilt = runtime.catalog.serving(SUMMARIES)
            assert rebuilt is not None
            assert rebuilt.generation > killed.generation
            assert rebuilt.position == head
            assert _live_generations(runtime) == [rebuilt.generation]
            assert _table_of(killed.generation) not in _table_names(runtime)
            assert _table_of(serving.generation) not in _table_names(runtime)
            assert checksum(table_contents(runtime, SUMMARIES)) == original
            assert summary_figures(runtime) == store_figures(ledger)
