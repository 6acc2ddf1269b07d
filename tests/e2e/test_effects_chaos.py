"""Chaos: a flaky receiver, SIGKILLed workers and dispatchers; every effect still lands once."""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from typing import Any

import pytest
from sqlalchemy import Row, func, select

from domain.eventstore import START
from projections.effects.outbox import (
    DELIVERED,
    PENDING,
    Subscription,
    attempts,
    effect_id,
    effects,
)
from projections.effects.service import Effects
from projections.engine.catalog import SERVING
from projections.engine.runtime import ProjectionRuntime
from tests.e2e.conftest import Deploy
from tests.support.chaos import (
    FlakyReceiver,
    OrderWriter,
    ReceiverLog,
    Victim,
)
from tests.support.orders import place_and_follow
from tests.support.receivers import LOCAL_TARGETS
from tests.support.stores import all_serving_at, generations_by_role, opened_store
from tests.support.waiting import wait_for

ORDERS = 2_000
WRITE_SECONDS = 70.0
"""Orders are spread over this long, so they keep flowing while the kills happen."""
ORDERS_BEFORE_SUBSCRIBING = 20
KILLS = 20
SEED = 20240611
SETTLE = 120.0
"""Longest the outbox may take to drain once the chaos stops, on a loaded machine."""

CHAOS_SETTINGS = {
    "effect_backoff_base": 0.05,
    "effect_backoff_cap": 1,
    # Enough that 30% failures never exhaust an effect: only delivery ends one.
    "effect_max_attempts": 50,
    # Short leases so a SIGKILLed process's claims and leases expire quickly.
    "effect_claim_ttl": 2,
    # Every effect goes to the one receiver: let all of a dispatcher's deliveries use it, beside
    # the claims a killed dispatcher leaves behind until they expire (they count to the limit).
    "effect_per_target": 64,
    "projection_lease_ttl": 2,
}


def _outbox_rows(runtime: ProjectionRuntime) -> list[Row[Any]]:
    with runtime.engine.connect() as conn:
        c = effects.c
        query = select(c.id, c.effect, c.position, c.order_id, c.event_type, c.status)
        return sorted(conn.execute(query))


def _pending(runtime: ProjectionRuntime) -> int:
    with runtime.engine.connect() as conn:
        query = select(func.count()).select_from(effects).where(effects.c.status == PENDING)
        return int(conn.execute(query).scalar_one())


def _attempt_count(runtime: ProjectionRuntime) -> int:
    with runtime.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(attempts)).scalar_one())


def _event_positions(runtime: ProjectionRuntime) -> dict[int, tuple[str, str]]:
    """Every event in the store: position -> (order id, event type)."""
    found: dict[int, tuple[str, str]] = {}
    after = START
    while True:
        batch = runtime.source.read(after, 2000)
        for recorded in batch.events:
            found[recorded.position] = (str(recorded.event.originator_id), recorded.type_name)
        if batch.reached_head or batch.checkpoint == after:
            return found
        after = batch.checkpoint


def _assert_outbox_holds_what_the_events_call_for(
    rows: list[Row[Any]], events: dict[int, tuple[str, str]], subscription: Subscription
) -> None:
    """One delivered webhook effect per event after the subscription, with its stable id."""
    assert Counter(row.status for row in rows) == {DELIVERED: len(rows)}
    recorded = [(row.effect, row.position) for row in rows]
    assert len(recorded) == len(set(recorded))
    assert set(recorded) == {
        (f"webhook:{subscription.id}", position)
        for position in events
        if position > subscription.created_position
    }
    assert all(row.id == effect_id(row.effect, row.position) for row in rows)
    assert all(events[row.position] == (row.order_id, row.event_type) for row in rows)


def _assert_applied_once_each_in_order(seen: ReceiverLog, rows: list[Row[Any]]) -> None:
    """The receiver applied every outbox effect once, nothing else, each order's in order."""
    assert seen.rejected == []
    applied_ids = [item.id for item in seen.applied]
    assert len(applied_ids) == len(set(applied_ids))
    assert set(applied_ids) == {row.id for row in rows}
    assert set(seen.accepted) == set(applied_ids)
    by_id = {row.id: row for row in rows}
    assert all(
        (item.position, item.order_id, item.type)
        == (by_id[item.id].position, by_id[item.id].order_id, by_id[item.id].event_type)
        for item in seen.applied
    )
    positions_by_order: dict[str, list[int]] = defaultdict(list)
    for item in seen.applied:
        positions_by_order[item.order_id].append(item.position)
    out_of_order = {
        order: positions
        for order, positions in positions_by_order.items()
        if positions != sorted(positions)
    }
    assert out_of_order == {}


@pytest.mark.slow
class TestEffectsUnderChaos:
    """Kills and a flaky receiver lose, duplicate and reorder no effect."""

    def test_every_effect_is_applied_once_despite_kills_and_a_flaky_receiver(
        self, store_url: str, deploy: Deploy
    ) -> None:
        """2,000 orders, 20+ kills of each process; the receiver applies each effect once."""
        rng = random.Random(SEED)
        receiver = FlakyReceiver(seed=SEED)
        receiver.start()
        writer = OrderWriter(
            store_url,
            orders=ORDERS,
            seconds=WRITE_SECONDS,
            seed=SEED,
        )
        try:
            with (
                opened_store(store_url) as (ledger, runtime),
                deploy(store_url, **CHAOS_SETTINGS) as deployment,
            ):
                names = [p.name for p in runtime.projections]

                # Orders recorded before the subscription trigger nothing for it.
                for _ in range(ORDERS_BEFORE_SUBSCRIBING):
                    place_and_follow(ledger, rng)
                created = Effects(runtime.engine, runtime.source, LOCAL_TARGETS).add_subscription(
                    receiver.url, ["*"]
                )
                receiver.secret = created.secret
                subscription = created.subscription

                # Orders flow while both processes are killed at random moments and restarted.
                workers = Victim(deployment, ["worker", "--no-effects"], rng, longest=1.5)
                dispatchers = Victim(deployment, ["worker", "--no-projections"], rng, longest=1.5)
                writer.start()
                while writer.running() or min(workers.kills, dispatchers.kills) < KILLS:
                    now = time.monotonic()
                    workers.tick(now, keep_killing=workers.kills < KILLS or writer.running())
                    dispatchers.tick(
                        now, keep_killing=dispatchers.kills < KILLS or writer.running()
                    )
                    time.sleep(0.05)
                writer.join(10)
                head = ledger.head_position()

                # The last restarted pair catches up and drains the outbox.
                def settled() -> bool:
                    workers.tick(time.monotonic(), keep_killing=False)
                    dispatchers.tick(time.monotonic(), keep_killing=False)
                    return all_serving_at(runtime, names, head) and (_pending(runtime) == 0)

                wait_for(
                    settled,
                    "the projections reach the head and no effect is pending",
                    timeout=SETTLE,
                )

                rows = _outbox_rows(runtime)
                events = _event_positions(runtime)
                seen = receiver.snapshot()
                print(  # shown with -s: how hard the run was
                    f"\n{len(rows)} effects, {seen.requests} requests ({seen.failed} failed, "
                    f"{seen.incomplete} cut off, "
                    f"{seen.dropped_before_applying} dropped unapplied, "
                    f"{seen.dropped_after_applying} dropped applied, "
                    f"{seen.seen_again_after_applying} seen again after applying); "
                    f"{workers.kills} worker kills, {dispatchers.kills} dispatcher kills"
                )

                assert len(rows) >= 2 * ORDERS
                _assert_outbox_holds_what_the_events_call_for(rows, events, subscription)
                _assert_applied_once_each_in_order(seen, rows)
                # Redeliveries of applied effects happened, and deduplication absorbed them.
                assert seen.seen_again_after_applying > 0
                assert workers.kills >= KILLS
                assert dispatchers.kills >= KILLS

                # A rebuild of every projection, with both processes running, records and
                # delivers nothing new.
                attempts_before = _attempt_count(runtime)
                serving_before = generations_by_role(runtime, SERVING)
                deployment.run("rebuild", "--all")
                wait_for(
                    lambda: all_serving_at(runtime, names, head),
                    "every rebuilt projection serves at the head",
                    timeout=SETTLE,
                )
                serving_after = generations_by_role(runtime, SERVING)
                assert all(
                    serving_after[name].generation > serving_before[name].generation
                    for name in names
                )
                # Long enough for the running dispatcher to poll the outbox several times.
                time.sleep(1.5)
                workers.tick(time.monotonic(), keep_killing=False)
                dispatchers.tick(time.monotonic(), keep_killing=False)
                assert _outbox_rows(runtime) == rows
                assert _attempt_count(runtime) == attempts_before
                assert receiver.snapshot().requests == seen.requests
        finally:
            writer.stop()
            receiver.stop()
