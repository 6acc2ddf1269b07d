"""Rebuilds: a new generation is built beside the serving one and takes over in one step."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, Table, text

from projections.engine.catalog import BUILDING, SERVING, NewerVersionError
from projections.engine.database import write_transaction
from projections.engine.point_read import PointReader
from projections.engine.processor import Outcome, Processor, ProcessorSettings
from projections.engine.rebuild import RebuildFailedError, rebuild
from projections.engine.runtime import ProjectionRuntime
from projections.engine.status import REFUSED, projection_status
from projections.engine.worker import Worker
from projections.order_summaries import OrderSummaryProjection
from projections.registry import all_projections
from tests.support.engine import (
    WAIT_TIMEOUT,
    OrderSummaryProjectionV2,
    checksum,
    generation_rows,
    only_generation,
    opened,
    place_and_pay,
    rows_of,
    serving_rows,
    table_names,
)
from tests.support.waiting import wait_for

SUMMARIES = OrderSummaryProjection.name
BASE = "order_summaries"

Rows = list[tuple[Any, ...]]


def caught_up(worker: Worker) -> None:
    """Catch up, then give the leases up as a stopping worker does."""
    worker.run_until_caught_up(timeout=WAIT_TIMEOUT)
    for processor in worker.processors.values():
        processor.release()


def builder(runtime: ProjectionRuntime, generation: int, batch_size: int = 10) -> Processor:
    return Processor(
        runtime.catalog,
        runtime.source,
        runtime.projection(SUMMARIES),
        generation,
        "builder",
        ProcessorSettings(batch_size=batch_size),
    )


def served(runtime: ProjectionRuntime) -> tuple[str, Rows]:
    return serving_rows(runtime, SUMMARIES, BASE)


class TestReadersDuringARebuild:
    """Generation N serves every read until generation N+1 has caught up and taken over."""

    def test_readers_see_only_the_old_generation_until_the_new_one_takes_over(
        self, store_url: str
    ) -> None:
        """Stepping the rebuild a batch at a time, every read returns the serving tables' rows."""
        with opened(store_url, [OrderSummaryProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 30)
            caught_up(runtime.worker())
            old_name, old_rows = served(runtime)
            assert old_name == "order_summaries_g1"
            assert len(old_rows) == 30

            building = runtime.catalog.start_rebuild(SUMMARIES, target=ledger.head_position())
            assert (building.generation, building.role, building.position) == (2, BUILDING, 0)
            step = builder(runtime, 2)
            partial_sizes = []
            while (result := step.step()).outcome is Outcome.APPLIED:
                # Readers get the old generation, whole, while the new one is half built.
                assert served(runtime) == (old_name, old_rows)
                partial_sizes.append(len(generation_rows(runtime, SUMMARIES, 2, BASE)))
            assert result.outcome is Outcome.PROMOTED
            assert len(partial_sizes) >= 4
            assert all(0 < size < 30 for size in partial_sizes), partial_sizes

            new_name, new_rows = served(runtime)
            assert new_name == "order_summaries_g2"
            assert checksum(new_rows) == checksum(old_rows)
            assert "order_summaries_g1" not in table_names(runtime)
            assert "order_summaries_g2" in table_names(runtime)
            rows = runtime.catalog.rows(SUMMARIES)
            assert [(r.generation, r.role, r.position) for r in rows] == [
                (2, SERVING, ledger.head_position())
            ]

    def test_the_serving_generation_keeps_following_new_events_during_a_rebuild(
        self, store_url: str
    ) -> None:
        """Orders placed mid-rebuild reach readers at once and are in the new generation too."""
        with opened(store_url, [OrderSummaryProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 20)
            caught_up(runtime.worker())
            runtime.catalog.start_rebuild(SUMMARIES)
            step = builder(runtime, 2)
            assert step.step().outcome is Outcome.APPLIED

            place_and_pay(ledger, 5, prefix="mid")
            server = Processor(
                runtime.catalog, runtime.source, runtime.projection(SUMMARIES), 1, "server"
            )
            assert server.step().outcome is Outcome.APPLIED
            name, rows = served(runtime)
            assert (name, len(rows)) == ("order_summaries_g1", 25)

            while step.step().outcome is Outcome.APPLIED:
                assert served(runtime) == (name, rows)

            assert served(runtime) == ("order_summaries_g2", rows)

    def test_the_old_generations_processor_stops_cleanly_after_the_takeover(
        self, store_url: str
    ) -> None:
        """New events after the switch: the retired generation's processor stands down, no error."""
        with opened(store_url, [OrderSummaryProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 5)
            caught_up(runtime.worker())
            server = Processor(
                runtime.catalog, runtime.source, runtime.projection(SUMMARIES), 1, "server"
            )
            assert server.step().outcome is Outcome.IDLE  # holds generation 1's lease
            runtime.catalog.start_rebuild(SUMMARIES)
            step = builder(runtime, 2)
            while step.step().outcome is not Outcome.PROMOTED:
                pass
            place_and_pay(ledger, 2, prefix="after")

            outcome = server.step().outcome

            assert outcome in {Outcome.LOST, Outcome.FINISHED}
            assert server.step().outcome is Outcome.FINISHED

    def test_reading_through_the_switch_over_does_not_error(self, store_url: str) -> None:
        """A read that chose the old tables just before the takeover still reads them whole."""
        with opened(store_url, [OrderSummaryProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 12)
            caught_up(runtime.worker())
            _, old_rows = served(runtime)
            runtime.catalog.start_rebuild(SUMMARIES)
            step = builder(runtime, 2, batch_size=5)
            # 24 events in batches of 5: four batches now, the last one in the thread below.
            for _ in range(4):
                assert step.step().outcome is Outcome.APPLIED

            finished = threading.Event()

            def take_over() -> None:
                while step.step().outcome is not Outcome.PROMOTED:
                    pass
                finished.set()

            with runtime.reading(SUMMARIES) as (conn, tables):
                assert tables[BASE].name == "order_summaries_g1"
                thread = threading.Thread(target=take_over)
                thread.start()
                # Wait until the new generation serves and the old tables are dropped, or the
                # drop waits for this read to end: either way the switch has happened.
                wait_for(
                    lambda: (
                        only_generation(runtime, SUMMARIES, SERVING).generation == 2
                        and (finished.is_set() or _drop_is_waiting(runtime))
                    ),
                    "the rebuild took over",
                    timeout=WAIT_TIMEOUT,
                )
                rows = rows_of(conn, tables[BASE])
            thread.join(WAIT_TIMEOUT)

            assert rows == old_rows
            assert served(runtime) == ("order_summaries_g2", old_rows)

    def test_read_reruns_a_query_that_raced_the_switch_over(self, store_url: str) -> None:
        """runtime.read: the takeover lands between choosing the tables and querying them."""
        with opened(store_url, [OrderSummaryProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 12)
            caught_up(runtime.worker())
            _, old_rows = served(runtime)
            runtime.catalog.start_rebuild(SUMMARIES)
            step = builder(runtime, 2, batch_size=5)
            for _ in range(4):
                assert step.step().outcome is Outcome.APPLIED
            finished = threading.Event()

            def take_over() -> None:
                while step.step().outcome is not Outcome.PROMOTED:
                    pass
                finished.set()

            chosen: list[str] = []
            thread = threading.Thread(target=take_over)

            def query(conn: Connection, tables: dict[str, Table]) -> Rows:
                chosen.append(tables[BASE].name)
                if len(chosen) == 1:
                    thread.start()
                    wait_for(
                        lambda: (
                            only_generation(runtime, SUMMARIES, SERVING).generation == 2
                            and (finished.is_set() or _drop_is_waiting(runtime))
                        ),
                        "the rebuild took over",
                        timeout=WAIT_TIMEOUT,
                    )
                return rows_of(conn, tables[BASE])

            rows = runtime.read(SUMMARIES, query)
            thread.join(WAIT_TIMEOUT)

            assert rows == old_rows
            assert chosen[0] == "order_summaries_g1"
            assert served(runtime) == ("order_summaries_g2", old_rows)

    def test_concurrent_readers_never_see_a_half_built_generation(self, store_url: str) -> None:
        """Reader threads reading all through a rebuild always get every order, and no error."""
        with opened(store_url, [OrderSummaryProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 25)
            caught_up(runtime.worker())
            _, old_rows = served(runtime)
            runtime.catalog.start_rebuild(SUMMARIES)
            step = builder(runtime, 2, batch_size=4)
            done = threading.Event()
            seen: list[tuple[str, int]] = []
            errors: list[BaseException] = []

            def read_until_done() -> None:
                while not done.is_set():
                    try:
                        name, rows = served(runtime)
                    except Exception as error:
                        errors.append(error)
                        return
                    seen.append((name, checksum(rows) == checksum(old_rows)))

            readers = [threading.Thread(target=read_until_done) for _ in range(2)]
            for reader in readers:
                reader.start()
            try:
                while step.step().outcome is not Outcome.PROMOTED:
                    pass
                served_after = served(runtime)
            finally:
                done.set()
                for reader in readers:
                    reader.join(WAIT_TIMEOUT)

            assert errors == []
            assert seen, "the readers never read"
            assert all(whole for _, whole in seen), "a reader saw rows other than the full set"
            assert served_after == ("order_summaries_g2", old_rows)


class TestAVersionBump:
    """New code with a higher version rebuilds; the old version serves until it takes over."""

    def test_prepare_starts_a_rebuild_and_the_old_version_serves_until_takeover(
        self, store_url: str
    ) -> None:
        """Version 2 builds generation 2 while version 1 keeps serving and following events."""
        with (
            opened(store_url, [OrderSummaryProjection()]) as (ledger, old),
            opened(store_url, [OrderSummaryProjectionV2()], batch_size=10) as (_, new),
        ):
            place_and_pay(ledger, 20)
            old_worker = old.worker()
            caught_up(old_worker)

            new_worker = new.worker()
            new_worker.prepare()

            rows = new.catalog.rows(SUMMARIES)
            assert [(r.generation, r.version, r.role) for r in rows] == [
                (1, 1, SERVING),
                (2, 2, BUILDING),
            ]
            # A second prepare (another replica starting) does not start another rebuild.
            new_worker.prepare()
            assert len(new.catalog.rows(SUMMARIES)) == 2

            new_worker.run_once()
            new_worker.run_once()
            assert only_generation(new, SUMMARIES, BUILDING).position == 20
            place_and_pay(ledger, 4, prefix="mid")
            caught_up(old_worker)
            expected = served(old)
            assert expected[0] == "order_summaries_g1"
            assert len(expected[1]) == 24
            assert served(new) == expected

            caught_up(new_worker)

            rows = new.catalog.rows(SUMMARIES)
            assert [(r.generation, r.version, r.role) for r in rows] == [(2, 2, SERVING)]
            assert served(new) == ("order_summaries_g2", expected[1])
            assert served(old) == ("order_summaries_g2", expected[1])
            assert "order_summaries_g1" not in table_names(new)


class TestStartingARebuild:
    """start_rebuild is idempotent while one runs; restart=True throws the progress away."""

    def test_start_rebuild_while_one_is_in_progress_returns_the_same_generation(
        self, store_url: str
    ) -> None:
        """The second call returns the building generation with the progress it has made."""
        with opened(store_url, [OrderSummaryProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 15)
            caught_up(runtime.worker())
            first = runtime.catalog.start_rebuild(SUMMARIES)
            step = builder(runtime, first.generation)
            assert step.step().outcome is Outcome.APPLIED

            again = runtime.catalog.start_rebuild(SUMMARIES)

            assert again.generation == first.generation == 2
            assert again.position == step.checkpoint.position == 10
            assert len(runtime.catalog.rows(SUMMARIES)) == 2

    def test_restart_drops_the_partial_generation_and_starts_over_from_zero(
        self, store_url: str
    ) -> None:
        """restart=True: a new generation at position 0, the partial one's tables gone."""
        with opened(store_url, [OrderSummaryProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 15)
            caught_up(runtime.worker())
            _, old_rows = served(runtime)
            first = runtime.catalog.start_rebuild(SUMMARIES)
            step = builder(runtime, first.generation)
            assert step.step().outcome is Outcome.APPLIED

            restarted = runtime.catalog.start_rebuild(SUMMARIES, restart=True)

            assert (restarted.role, restarted.position, restarted.failed) == (BUILDING, 0, False)
            rows = runtime.catalog.rows(SUMMARIES)
            assert [(r.generation, r.role) for r in rows] == [
                (1, SERVING),
                (restarted.generation, BUILDING),
            ]
            assert generation_rows(runtime, SUMMARIES, restarted.generation, BASE) == []
            # The abandoned builder's lease does not let it write into the new generation.
            assert step.step().outcome is not Outcome.APPLIED
            assert generation_rows(runtime, SUMMARIES, restarted.generation, BASE) == []
            assert only_generation(runtime, SUMMARIES, BUILDING).position == 0

            caught_up(runtime.worker())

            name = f"order_summaries_g{restarted.generation}"
            assert served(runtime) == (name, old_rows)
            assert {n for n in table_names(runtime) if n.startswith(BASE)} == {name}

    def test_a_worker_whose_rebuild_was_restarted_under_it_builds_the_new_one(
        self, store_url: str
    ) -> None:
        """A running worker half way through a rebuild that an operator restarts finishes anew."""
        with opened(store_url, [OrderSummaryProjection()], batch_size=10) as (ledger, runtime):
            # Payments after all the placements: a batch of them needs the earlier rows.
            orders = place_and_pay(ledger, 15, pay=False)
            for index, order_id in enumerate(orders):
                ledger.capture_payment(order_id, amount=50, payment_reference=f"late-{index}")
            caught_up(runtime.worker())
            _, old_rows = served(runtime)
            runtime.catalog.start_rebuild(SUMMARIES)
            worker = runtime.worker()
            worker.run_once()
            worker.run_once()
            assert only_generation(runtime, SUMMARIES, BUILDING).position == 20

            runtime.catalog.start_rebuild(SUMMARIES, restart=True)
            worker.run_until_caught_up(timeout=WAIT_TIMEOUT)

            rows = runtime.catalog.rows(SUMMARIES)
            assert [(r.role, r.failed) for r in rows] == [(SERVING, False)], rows
            assert rows[0].generation != 1
            assert served(runtime) == (f"order_summaries_g{rows[0].generation}", old_rows)


def _drop_is_waiting(runtime: ProjectionRuntime) -> bool:
    """On PostgreSQL, whether some statement waits for a lock (the drop behind our read)."""
    if runtime.engine.dialect.name != "postgresql":
        return False
    with runtime.engine.connect() as conn:
        waiting = conn.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar()
        return bool(waiting)


class TestASwitchOverBehindALongReader:
    """A session still reading the retired tables holds up neither the worker nor readers."""

    @pytest.mark.postgres
    def test_the_worker_and_point_reads_go_on_and_the_drop_waits_for_the_reader(
        self, postgres_url: str
    ) -> None:
        """ACCESS SHARE held on the old table: the drop stays pending until the reader leaves."""
        with opened(postgres_url, all_projections()) as (ledger, runtime):
            before = place_and_pay(ledger, 10)
            runtime.worker().run_until_caught_up(timeout=WAIT_TIMEOUT)
            reader = PointReader(runtime.engine, runtime.catalog, SUMMARIES, BASE)
            # The reader keeps a statement for generation 1 from before the switch-over.
            assert (first := reader.get(str(before[0]))) is not None and first.row is not None
            runtime.catalog.start_rebuild(SUMMARIES, target=ledger.head_position())
            worker = runtime.worker(idle_wait=0.05)
            holder = psycopg.connect(postgres_url)  # a long psql session or pg_dump
            try:
                holder.execute("SELECT 1 FROM order_summaries_g1 LIMIT 1")
                worker.start()
                wait_for(
                    lambda: only_generation(runtime, SUMMARIES, SERVING).generation == 2,
                    "the rebuild took over",
                    timeout=WAIT_TIMEOUT,
                )
                after = place_and_pay(ledger, 3, prefix="after")
                head = ledger.head_position()
                # Every other projection, the outbox included, keeps following the store.
                others = [p.name for p in runtime.projections if p.name != SUMMARIES]
                assert "outbox" in others
                wait_for(
                    lambda: all(
                        only_generation(runtime, name, SERVING).position >= head for name in others
                    ),
                    "the worker applied the new events to the other projections",
                    timeout=WAIT_TIMEOUT,
                )
                wait_for(
                    lambda: only_generation(runtime, SUMMARIES, SERVING).position >= head,
                    "the worker applied the new events to the new generation",
                    timeout=WAIT_TIMEOUT,
                )
                started = time.monotonic()
                new = reader.get(str(after[0]))
                old = reader.get(str(before[0]))
                assert time.monotonic() - started < WAIT_TIMEOUT / 2
                assert new is not None and new.row is not None and new.checkpoint.position >= head
                assert old is not None and old.row == first.row
                status = projection_status(runtime.catalog, runtime.source, SUMMARIES)
                assert status.pending_drops == [1]
                assert "order_summaries_g1" in table_names(runtime)

                holder.rollback()
                wait_for(
                    lambda: "order_summaries_g1" not in table_names(runtime),
                    "the retired tables were dropped once the reader left",
                    timeout=WAIT_TIMEOUT,
                )
                status = projection_status(runtime.catalog, runtime.source, SUMMARIES)
                assert status.pending_drops == []
            finally:
                holder.close()
                worker.stop()
                reader.close()


class TestARollingUpgrade:
    """Older code restarting beside newer code never undoes or replaces the newer generation."""

    def test_an_older_worker_leaves_a_newer_build_in_progress_alone(self, store_url: str) -> None:
        """Version 2 is building; a version 1 worker restarts: the build stays, status says why."""
        with (
            opened(store_url, [OrderSummaryProjection()]) as (ledger, old),
            opened(store_url, [OrderSummaryProjectionV2()], batch_size=10) as (_, new),
        ):
            place_and_pay(ledger, 20)
            caught_up(old.worker())
            new_worker = new.worker()
            new_worker.prepare()
            new_worker.run_once()
            building = only_generation(new, SUMMARIES, BUILDING)
            assert (building.version, building.position) == (2, 10)

            old.worker().prepare()
            with pytest.raises(NewerVersionError, match="store has version 2"):
                old.catalog.start_rebuild(SUMMARIES, restart=True)

            with pytest.raises(RebuildFailedError, match="this worker runs 1"):
                rebuild(old, SUMMARIES)
            assert only_generation(old, SUMMARIES, BUILDING) == building
            status = projection_status(old.catalog, old.source, SUMMARIES)
            assert status.state == REFUSED
            assert status.refused == "refused: store has version 2, this worker runs 1"

    def test_an_older_worker_does_not_rebuild_a_newer_serving_generation(
        self, store_url: str
    ) -> None:
        """Version 2 serves; a version 1 worker restarting starts no rebuild back to version 1."""
        with (
            opened(store_url, [OrderSummaryProjection()]) as (ledger, old),
            opened(store_url, [OrderSummaryProjectionV2()]) as (_, new),
        ):
            place_and_pay(ledger, 12)
            caught_up(old.worker())
            caught_up(new.worker())
            assert only_generation(new, SUMMARIES, SERVING).version == 2

            old.worker().prepare()

            rows = old.catalog.rows(SUMMARIES)
            assert [(r.generation, r.version, r.role) for r in rows] == [(2, 2, SERVING)]
            status = projection_status(old.catalog, old.source, SUMMARIES)
            assert (status.state, status.refused) == (
                REFUSED,
                "refused: store has version 2, this worker runs 1",
            )


class TestPromotionNeverGoesBackwards:
    """A rebuilt generation takes over only at or past the serving generation's position."""

    def test_a_generation_behind_the_serving_one_is_not_promoted(self, store_url: str) -> None:
        """Promoting at a position before the serving one's changes nothing."""
        with opened(store_url, [OrderSummaryProjection()]) as (ledger, runtime):
            place_and_pay(ledger, 15)
            caught_up(runtime.worker())
            serving = only_generation(runtime, SUMMARIES, SERVING)
            runtime.catalog.start_rebuild(SUMMARIES)
            step = builder(runtime, 2)
            assert step.step().outcome is Outcome.APPLIED
            assert step.lease is not None and step.checkpoint < serving.checkpoint

            with write_transaction(runtime.engine) as conn:
                promoted = runtime.catalog.promote(conn, step.lease, step.checkpoint)

            assert only_generation(runtime, SUMMARIES, SERVING) == serving
            assert promoted is False
            assert only_generation(runtime, SUMMARIES, BUILDING).generation == 2

            step.release()  # as a stopping builder does, so the worker need not wait it out
            caught_up(runtime.worker())
            assert only_generation(runtime, SUMMARIES, SERVING).generation == 2
