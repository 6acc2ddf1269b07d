"""Concurrent writers on PostgreSQL: commits per second with 1-16 writer processes.

Each writer process does little but save prepared events, one event per transaction, so that
the database is what is measured. Four variants on the same table shape, each in a fresh
database: ours (``PostgresEventRecorder``: no table lock, the transaction id in each row, one
statement committed on its own, NOTIFY after commit), the library's recorder (``LOCK TABLE ...
EXCLUSIVE`` and NOTIFY inside every transaction), raw psycopg BEGIN, INSERT and COMMIT of the
same rows (the ceiling the goal names), and raw psycopg's INSERT alone in autocommit mode (the
ceiling of ours' own shape). Goals: ours at least 3x the locking recorder with 8 writers, and
at least 70% of raw.

Then the whole write path as users run it: ``orderledger demo`` (400 orders each) in 1 and in
8 processes on one database, events per second from the first start to the last exit. Goal: 8
processes at least 1.5x one.

Last, SQLite (one writer at a time): does the group commit raise throughput? ``place_order``
from 1, 16 and 64 threads of one process, with the projection worker running as ``serve`` runs
it, saves grouped as shipped against each save committed alone (groups of at most one), the
two taking turns on one store. Goal: more orders per second at 16 and 64 threads.
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import orjson
import psycopg
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

from api.bootstrap import Opened, opened
from api.settings import Settings
from benchmarks.common import (
    console,
    library_env,
    machine_description,
    note,
    postgres_admin_url,
    postgres_unreachable_reason,
    print_description,
    print_table,
    temporary_postgres_url,
    temporary_sqlite_url,
)
from domain.eventstore import PostgresEventRecorder, event_store_env
from domain.ledger import OrderLedger
from projections.engine.status import all_statuses

OURS = "orderledger"
LOCKING = "library (table lock)"
RAW = "raw psycopg"
RAW_STATEMENT = "raw, autocommit"
VARIANTS = (OURS, LOCKING, RAW, RAW_STATEMENT)
WRITERS = (1, 2, 4, 8, 16)
TOPIC = "domain.order:Order.Placed"
STATE = orjson.dumps(
    {
        "timestamp": {"_type_": "datetime_iso", "_data_": "2026-12-05T10:00:00+00:00"},
        "customer_id": "cust-bench",
        "currency": "EUR",
        "lines": [{"sku": "SKU-TEA-001", "quantity": 2, "unit_price": 1250}],
    }
)
LOCK_GOAL = 3.0
RAW_GOAL = 0.70
DEMO_GOAL = 1.5
DEMO_ORDERS = 400


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="how long each round writes (default 3)"
    )
    parser.add_argument(
        "--writers",
        type=int,
        nargs="+",
        default=list(WRITERS),
        help="writer process counts to measure (default 1 2 4 8 16)",
    )
    parser.add_argument("--markdown", action="store_true", help="tables as Markdown")
    parser.add_argument(
        "--demo-processes",
        type=int,
        default=8,
        help="orderledger demo processes measured against one (0 skips; default 8)",
    )
    parser.add_argument(
        "--sqlite-seconds",
        type=float,
        default=4.0,
        help="seconds per SQLite group commit round (0 skips; default 4)",
    )
    parser.add_argument(
        "--postgres",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the PostgreSQL writers (--no-postgres: only SQLite's group commit)",
    )


def _recorder(variant: str, url: str) -> Any:
    """The variant's recorder on the store at ``url`` (None for raw psycopg)."""
    if variant in (RAW, RAW_STATEMENT):
        return None
    env = event_store_env(url) if variant == OURS else library_env(url)
    datastore = PostgresDatastore(
        dbname=env["POSTGRES_DBNAME"],
        host=env["POSTGRES_HOST"],
        port=env["POSTGRES_PORT"],
        user=env["POSTGRES_USER"],
        password=env["POSTGRES_PASSWORD"],
        schema=env["POSTGRES_SCHEMA"],
        pool_size=2,
        lock_timeout=30,
    )
    cls = PostgresEventRecorder if variant == OURS else PostgresApplicationRecorder
    return cls(datastore)


def _writer(variant: str, url: str, seconds: float, ready: Any, counts: Any, slot: int) -> None:
    """Save one prepared event per transaction until the time is up; report how many."""
    recorder = _recorder(variant, url)
    events = [
        StoredEvent(originator_id=uuid.uuid4(), originator_version=1, topic=TOPIC, state=STATE)
        for _ in range(20000)
    ]
    conn = None
    if recorder is None:
        conn = psycopg.connect(url.replace("postgresql://", "postgres://"), autocommit=True)
    done = 0
    ready.wait(60)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and done < len(events):
        stored = events[done]
        if conn is not None:
            with conn.transaction() if variant == RAW else nullcontext():
                conn.execute(
                    "INSERT INTO stored_events (originator_id, originator_version, topic, state) "
                    "VALUES (%s, %s, %s, %s)",
                    (stored.originator_id, 1, stored.topic, stored.state),
                    prepare=True,
                )
        else:
            recorder.insert_events([stored])
        done += 1
    counts[slot] = done
    if conn is not None:
        conn.close()
    if recorder is not None:
        recorder.datastore.close()


def commits_per_second(variant: str, writers: int, seconds: float, admin: str) -> float:
    """Total commits per second of ``writers`` processes of one variant, in a fresh database."""
    ctx = multiprocessing.get_context("spawn")
    with temporary_postgres_url(admin) as url:
        # Ours creates the table: our columns and triggers; the others write the same shape.
        creator = _recorder(OURS, url)
        creator.create_table()
        creator.datastore.close()
        ready = ctx.Barrier(writers + 1)
        counts = ctx.Array("q", writers)
        processes = [
            ctx.Process(target=_writer, args=(variant, url, seconds, ready, counts, n))
            for n in range(writers)
        ]
        for process in processes:
            process.start()
        ready.wait(120)
        started = time.perf_counter()
        for process in processes:
            process.join()
        elapsed = max(seconds, time.perf_counter() - started)
        if any(process.exitcode != 0 for process in processes):
            raise RuntimeError(f"a {variant} writer failed")
        return sum(counts[:]) / elapsed


def demo_events_per_second(processes: int, admin: str) -> float:
    """Events per second of ``processes`` concurrent ``orderledger demo`` runs on one database,
    from the first start to the last exit."""
    cli = str(Path(sys.executable).parent / "orderledger")
    with temporary_postgres_url(admin) as url:
        # The schema first, so the timed processes do not queue on creating it.
        subprocess.run(
            [cli, "demo", "-n", "1", "--database-url", url], check=True, capture_output=True
        )
        with psycopg.connect(url) as conn:
            before = conn.execute("SELECT count(*) FROM orderledger_events").fetchone()
        started = time.perf_counter()
        running = [
            subprocess.Popen(
                [cli, "demo", "-n", str(DEMO_ORDERS), "--seed", str(n), "--database-url", url],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for n in range(processes)
        ]
        if any(process.wait() != 0 for process in running):
            raise RuntimeError("an orderledger demo process failed")
        elapsed = time.perf_counter() - started
        with psycopg.connect(url) as conn:
            after = conn.execute("SELECT count(*) FROM orderledger_events").fetchone()
    assert before is not None and after is not None
    return (after[0] - before[0]) / elapsed


SQLITE_THREADS = (1, 16, 64)
SQLITE_ROUNDS = 2
"""Rounds of each variant, taking turns; the best of each is reported."""
ALONE = 1


def sqlite_group_commit(seconds: float) -> dict[tuple[int, int], tuple[float, float]]:
    """Orders per second and saves per transaction, by (threads, most saves per group), with
    the projection worker running, on one fresh SQLite store."""
    with temporary_sqlite_url() as url:
        settings = Settings(database_url=url)
        with opened(settings) as ready:
            worker = ready.runtime.worker(idle_wait=settings.projection_idle_wait)
            worker.start()
            try:
                best: dict[tuple[int, int], tuple[float, float]] = {}
                shipped = ready.ledger.recorder.groups.most
                for threads in SQLITE_THREADS:
                    for round_ in range(SQLITE_ROUNDS):
                        # Each goes first in every other round: neither always meets a
                        # store the other just grew.
                        for most in (ALONE, shipped)[:: 1 if round_ % 2 == 0 else -1]:
                            _settle(ready)
                            measured = _placing(ready.ledger, threads, most, seconds)
                            best[threads, most] = max(best.get((threads, most), measured), measured)
            finally:
                worker.stop()
    return best


def _settle(ready: Opened, timeout: float = 300.0) -> None:
    """Wait for the worker to catch up, so no round pays for the last one's projections."""
    deadline = time.monotonic() + timeout
    while any(
        status.lag_events for status in all_statuses(ready.runtime.catalog, ready.runtime.source)
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the projections did not catch up within {timeout:g} s")
        time.sleep(0.05)


def _placing(ledger: OrderLedger, threads: int, most: int, seconds: float) -> tuple[float, float]:
    """Orders per second from ``threads`` threads for ``seconds``, saves grouped by at most
    ``most``; and the mean number of saves per transaction."""
    groups = ledger.recorder.groups
    groups.most = most
    stop = time.monotonic() + seconds
    placed = [0] * threads

    def place(slot: int) -> None:
        while time.monotonic() < stop:
            ledger.place_order(
                customer_id=f"cust-{slot}-{placed[slot] % 50}",
                currency="EUR",
                lines=[{"sku": "SKU-TEA-001", "quantity": 2, "unit_price": 1250}],
            )
            placed[slot] += 1

    written, saves = groups.totals()
    started = time.monotonic()
    running = [threading.Thread(target=place, args=(slot,)) for slot in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    elapsed = time.monotonic() - started
    written_after, saves_after = groups.totals()
    return sum(placed) / elapsed, (saves_after - saves) / max(1, written_after - written)


def run(args: argparse.Namespace) -> int:
    admin = postgres_admin_url()
    unreachable = postgres_unreachable_reason(admin)
    if unreachable is not None:
        note(f"PostgreSQL: {unreachable}")
        return 1
    print_description(machine_description(admin))
    if args.postgres:
        report_postgres_writers(args, admin)
    if args.sqlite_seconds:
        report_sqlite_group_commit(args)
    return 0


def report_postgres_writers(args: argparse.Namespace, admin: str) -> None:
    counts: Sequence[int] = args.writers
    results: dict[tuple[str, int], float] = {}
    for writers in counts:
        for variant in VARIANTS:
            results[variant, writers] = commits_per_second(variant, writers, args.seconds, admin)
    rows = []
    for writers in counts:
        ours, locking, raw, statement = (results[v, writers] for v in VARIANTS)
        rows.append(
            [
                str(writers),
                f"{ours:,.0f}",
                f"{locking:,.0f}",
                f"{raw:,.0f}",
                f"{statement:,.0f}",
                f"{ours / locking:.2f}x",
                f"{ours / raw:.0%}",
                f"{ours / statement:.0%}",
            ]
        )
    print_table(
        f"Commits per second, one event each, {args.seconds:g} s per round",
        [
            "writers",
            OURS,
            LOCKING,
            RAW,
            RAW_STATEMENT,
            "ours / locking",
            "ours / raw",
            "ours / autocommit",
        ],
        rows,
        markdown=args.markdown,
    )
    if 8 in counts:
        lock_ratio = results[OURS, 8] / results[LOCKING, 8]
        raw_ratio = results[OURS, 8] / results[RAW, 8]
        met = lock_ratio >= LOCK_GOAL and raw_ratio >= RAW_GOAL
        console.print(
            f"8 writers: ours {lock_ratio:.2f}x the locking recorder (goal {LOCK_GOAL:g}x), "
            f"{raw_ratio:.0%} of raw (goal {RAW_GOAL:.0%}): "
            + ("[green]met[/green]" if met else "[red]not met[/red]")
        )
    if args.demo_processes:
        one = demo_events_per_second(1, admin)
        many = demo_events_per_second(args.demo_processes, admin)
        print_table(
            f"orderledger demo, {DEMO_ORDERS} orders per process, events per second",
            ["processes", "events/s", "against one"],
            [
                ["1", f"{one:,.0f}", "1.00x"],
                [str(args.demo_processes), f"{many:,.0f}", f"{many / one:.2f}x"],
            ],
            markdown=args.markdown,
        )
        ratio = many / one
        console.print(
            f"{args.demo_processes} demo processes: {ratio:.2f}x one (goal {DEMO_GOAL:g}x): "
            + ("[green]met[/green]" if ratio >= DEMO_GOAL else "[red]not met[/red]")
        )


def report_sqlite_group_commit(args: argparse.Namespace) -> None:
    measured = sqlite_group_commit(args.sqlite_seconds)
    shipped = max(most for _, most in measured)
    rows = []
    for threads in SQLITE_THREADS:
        (alone, _), (grouped, per_group) = measured[threads, ALONE], measured[threads, shipped]
        rows.append(
            [
                str(threads),
                f"{alone:,.0f}",
                f"{grouped:,.0f}",
                f"{grouped / alone - 1:+.0%}",
                f"{per_group:.1f}",
            ]
        )
    print_table(
        f"SQLite place_order per second, {args.sqlite_seconds:g} s per round, best of "
        f"{SQLITE_ROUNDS}",
        ["threads", "each save alone", "grouped", "gain", "saves per transaction"],
        rows,
        markdown=args.markdown,
    )
    gains = [measured[t, shipped][0] / measured[t, ALONE][0] - 1 for t in SQLITE_THREADS[1:]]
    console.print(
        "SQLite group commit: "
        + ", ".join(
            f"{g:+.0%} at {t} threads" for t, g in zip(SQLITE_THREADS[1:], gains, strict=True)
        )
    )
