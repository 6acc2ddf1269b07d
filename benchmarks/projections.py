"""Projections: catch-up rate, memory while rebuilding and live latency of the projection engine.

Catch-up: a store of real OrderLedger events (Order aggregates built in memory with their own
rules and saved many per transaction through the ledger's recorder) is projected from position
zero by our Worker, and for comparison by the ``eventsourcing`` library's own
``ProjectionRunner`` building the same ``order_summaries`` table one event per transaction.
Memory: peak RSS of a separate process rebuilding a large store. Live: a writer places orders at
a fixed rate while a Worker runs, and each order's summary row is polled until it is readable.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from eventsourcing.persistence import ListenNotifySubscription, Subscription, Tracking
from eventsourcing.postgres import PostgresTrackingRecorder
from eventsourcing.projection import Projection as LibraryProjection
from eventsourcing.projection import ProjectionRunner
from eventsourcing.sqlite import SQLiteTrackingRecorder
from psycopg.sql import SQL
from sqlalchemy import bindparam, func, select

from api.bootstrap import open_ledger, open_read_models, opened
from api.settings import Settings
from benchmarks.common import (
    STORES,
    cached_store_copy,
    console,
    machine_description,
    note,
    postgres_admin_url,
    postgres_unreachable_reason,
    print_description,
    print_table,
    temporary_store_url,
)
from benchmarks.write_path import unsealed_ledger
from domain.eventstore import SQLiteEventRecorder, event_store_env
from domain.ledger import OrderLedger
from domain.order import Order
from domain.summary import balance_due, order_status, refund_due
from projections.base import Projection
from projections.engine.processor import ProcessorSettings
from projections.order_summaries import OrderSummaryProjection
from projections.registry import all_projections
from projections.verify import verify_store

OURS = "orderledger Worker"
LIBRARY = "library ProjectionRunner"
CACHE_VERSION = 3
"""Bumped when stored events change shape (2: chained, 3: personal data sealed), so old cached
stores are not reused."""
"""Bump when the generated events change, so cached stores are made again."""
SAVE_CHUNK = 500
"""Orders per ``ledger.save`` while generating: one transaction each."""
GOALS = {"sqlite": 25.0, "postgres": 10.0}
LATENCY_GOALS_MS = {"sqlite": 100.0, "postgres": 50.0}
RSS_GOAL_MB = 300.0


# -- generating real events fast ---------------------------------------------------------------


def _order(index: int) -> Order:
    """One order with a realistic life: lines changed, paid, shipped, delivered or cancelled."""
    order = Order.place(
        customer_id=f"customer-{index % 5003:05d}",
        currency=("EUR", "USD", "GBP")[index % 3],
        lines=[
            {"sku": f"SKU-{index % 97:03d}", "quantity": 1 + index % 4, "unit_price": 1250},
            {"sku": f"SKU-{100 + index % 89:03d}", "quantity": 2, "unit_price": 899},
            {"sku": "SKU-GIFT-WRAP", "quantity": 1, "unit_price": 150},
        ],
        shipping_address="1 Example Street, 10115 Berlin, DE",
        client_reference=f"ref-{index}",
    )
    kind = index % 10
    if kind in (0, 1, 2):
        order.add_line(sku="SKU-EXTRA", quantity=1, unit_price=499)
    if kind == 3:
        order.remove_line(sku="SKU-GIFT-WRAP")
    if kind == 9:
        order.capture_payment(amount=1000, payment_reference=f"pay-{index}-a")
        order.cancel(reason="customer changed their mind")
        order.issue_refund(amount=1000, reason="cancelled")
        return order
    if kind == 8:
        return order
    if kind == 7:
        order.capture_payment(amount=order.total // 2, payment_reference=f"pay-{index}-a")
        return order
    order.capture_payment(amount=order.total, payment_reference=f"pay-{index}-a")
    if kind in (0, 1, 2, 3, 4, 5):
        order.ship(carrier="DHL", tracking_number=f"TRK{index:010d}")
        if kind != 5:
            order.deliver()
    return order


def fill_store(ledger: OrderLedger, events: int) -> int:
    """Record at least ``events`` events, many orders per transaction; the events recorded."""
    recorded = 0
    index = 0
    while recorded < events:
        chunk: list[Order] = []
        while recorded < events and len(chunk) < SAVE_CHUNK:
            order = _order(index)
            index += 1
            recorded += len(order.pending_events)
            chunk.append(order)
        ledger.save(*chunk)
    return recorded


def _sqlite_path(url: str) -> str:
    return url.split(":///", 1)[1]


@contextmanager
def event_store(
    store: str, events: int, postgres_admin: str, *, sealed: bool = True
) -> Iterator[tuple[str, int]]:
    """A fresh copy of a store holding ``events`` generated events: (url, events recorded).

    The first run generates the events and keeps them (a SQLite file under the cache directory,
    a PostgreSQL template database); later runs copy them, which takes seconds. ``sealed``
    False stores personal data in plain: the baseline for what sealing costs a catch-up.
    """
    key = f"proj_v{CACHE_VERSION}_{events}" + ("" if sealed else "_plain")
    generate = partial(_generate, events=events, sealed=sealed)
    with cached_store_copy(store, key, generate, postgres_admin) as url:
        yield url, _count(url)


def _generate(url: str, events: int, sealed: bool = True) -> None:
    started = time.perf_counter()
    ledger = open_ledger(Settings(database_url=url)) if sealed else unsealed_ledger(url)
    try:
        recorded = fill_store(ledger, events)
    finally:
        ledger.close()
    seconds = time.perf_counter() - started
    note(f"generated {recorded:,} events in {seconds:.1f}s ({recorded / seconds:,.0f}/s): {url}")


def _count(url: str) -> int:
    ledger = open_ledger(Settings(database_url=url))
    try:
        return ledger.head_position()
    finally:
        ledger.close()


# -- the library's own runner, building the same table -----------------------------------------

LIBRARY_TABLE = "library_order_summaries"
_SUMMARY_COLUMNS = (
    "order_id",
    "status",
    "customer_id",
    "currency",
    "line_count",
    "lines",
    "total",
    "captured",
    "refunded",
    "refund_due",
    "balance_due",
    "shipped",
    "delivered",
    "cancelled",
    "placed_at",
    "updated_at",
    "version",
    "last_position",
)


def fold_summary(row: dict[str, Any] | None, event: Any, position: int) -> dict[str, Any]:
    """The order_summaries row after one event, computed as our projection computes it."""
    order_id = str(event.originator_id)
    if isinstance(event, Order.Placed):
        lines = {line["sku"]: [line["quantity"], line["unit_price"]] for line in event.lines}
        row = {
            "order_id": order_id,
            "customer_id": event.customer_id,
            "currency": event.currency,
            "captured": 0,
            "refunded": 0,
            "shipped": False,
            "delivered": False,
            "cancelled": False,
            "placed_at": event.timestamp.isoformat(),
        }
    else:
        if row is None:
            raise LookupError(f"no summary for order {order_id}")
        row = dict(row)
        lines = json.loads(row["lines"])
        if isinstance(event, Order.LineAdded):
            lines[event.sku] = [event.quantity, event.unit_price]
        elif isinstance(event, Order.LineRemoved):
            del lines[event.sku]
        elif isinstance(event, Order.PaymentCaptured):
            row["captured"] += event.amount
        elif isinstance(event, Order.Shipped):
            row["shipped"] = True
        elif isinstance(event, Order.Delivered):
            row["delivered"] = True
        elif isinstance(event, Order.Cancelled):
            row["cancelled"] = True
        elif isinstance(event, Order.RefundIssued):
            row["refunded"] += event.amount
    row["lines"] = json.dumps(lines, separators=(",", ":"))
    row["line_count"] = len(lines)
    row["total"] = sum(quantity * price for quantity, price in lines.values())
    row["status"] = order_status(
        total=row["total"],
        captured=row["captured"],
        shipped=row["shipped"],
        delivered=row["delivered"],
        cancelled=row["cancelled"],
    )
    row["balance_due"] = balance_due(
        total=row["total"], captured=row["captured"], cancelled=row["cancelled"]
    )
    row["refund_due"] = refund_due(
        captured=row["captured"], refunded=row["refunded"], cancelled=row["cancelled"]
    )
    row["updated_at"] = event.timestamp.isoformat()
    row["version"] = event.originator_version
    row["last_position"] = position
    return row


_CREATE_LIBRARY_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {LIBRARY_TABLE} (order_id TEXT PRIMARY KEY, status TEXT, "
    "customer_id TEXT, currency TEXT, line_count INTEGER, lines TEXT, total BIGINT, "
    "captured BIGINT, refunded BIGINT, refund_due BIGINT, balance_due BIGINT, "
    "shipped BOOLEAN, delivered BOOLEAN, cancelled BOOLEAN, placed_at TEXT, updated_at TEXT, "
    "version INTEGER, last_position BIGINT)"
)


class SQLiteSummaryView(SQLiteTrackingRecorder):
    """The library's idiom for a materialised view: one transaction per event with tracking."""

    def construct_create_table_statements(self) -> list[str]:
        return [*super().construct_create_table_statements(), _CREATE_LIBRARY_TABLE]

    def apply(self, event: Any, tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as c:
            c.execute(
                f"SELECT * FROM {LIBRARY_TABLE} WHERE order_id = ?",
                (str(event.originator_id),),
            )
            found = c.fetchone()
            row = fold_summary(dict(found) if found else None, event, tracking.notification_id)
            c.execute(
                f"INSERT OR REPLACE INTO {LIBRARY_TABLE} ({', '.join(_SUMMARY_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_SUMMARY_COLUMNS))})",
                [row[column] for column in _SUMMARY_COLUMNS],
            )
            self._insert_tracking(c, tracking)


class PostgresSummaryView(PostgresTrackingRecorder):
    """The same view on PostgreSQL."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sql_create_statements.append(SQL(_CREATE_LIBRARY_TABLE).format())

    def apply(self, event: Any, tracking: Tracking) -> None:
        columns = ", ".join(_SUMMARY_COLUMNS)
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _SUMMARY_COLUMNS[1:])
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(
                f"SELECT * FROM {LIBRARY_TABLE} WHERE order_id = %s",
                (str(event.originator_id),),
                prepare=True,
            )
            found = curs.fetchone()
            row = fold_summary(dict(found) if found else None, event, tracking.notification_id)
            curs.execute(
                f"INSERT INTO {LIBRARY_TABLE} ({columns}) "
                f"VALUES ({', '.join(['%s'] * len(_SUMMARY_COLUMNS))}) "
                f"ON CONFLICT (order_id) DO UPDATE SET {updates}",
                [row[column] for column in _SUMMARY_COLUMNS],
                prepare=True,
            )
            self._insert_tracking(curs, tracking)


class LibraryOrderSummaries(LibraryProjection[Any]):
    """order_summaries as a library Projection: each event folded into its row."""

    name = "library_order_summaries"
    topics = tuple(OrderSummaryProjection().topics)

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.apply(domain_event, tracking)


class PollingSQLiteRecorder(SQLiteEventRecorder):
    """Our SQLite recorder with the subscription the library leaves out on SQLite: polling."""

    def subscribe(self, gt: int | None = None, topics: Sequence[str] = ()) -> Subscription[Any]:
        return _PollingSubscription(self, gt=gt, topics=topics)


class _PollingSubscription(ListenNotifySubscription[Any]):
    """The library's pull loop, woken every 50 ms instead of by NOTIFY."""

    def __init__(self, recorder: Any, gt: int | None = None, topics: Sequence[str] = ()) -> None:
        super().__init__(recorder=recorder, gt=gt, topics=topics)
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._has_been_stopped:
            time.sleep(0.05)
            self._has_been_notified.set()


def library_catch_up(store: str, url: str, events: int) -> tuple[float, float]:
    """Wall and CPU seconds the library's ProjectionRunner takes to project the first events."""
    env = event_store_env(url)
    if store == "sqlite":
        env["APPLICATION_RECORDER_TOPIC"] = f"{__name__}:PollingSQLiteRecorder"
    started, started_cpu = time.perf_counter(), time.process_time()
    with ProjectionRunner(
        application_class=OrderLedger,
        projection_class=LibraryOrderSummaries,
        view_class=SQLiteSummaryView if store == "sqlite" else PostgresSummaryView,
        env=env,
    ) as runner:
        while (runner.view.max_tracking_id(runner.app_name) or 0) < events:
            runner.run_forever(timeout=0.02)  # re-raises the runner's error, if any
        return time.perf_counter() - started, time.process_time() - started_cpu


# -- ours --------------------------------------------------------------------------------------


def projection_named(name: str) -> Projection:
    for projection in all_projections():
        if projection.name == name:
            return projection
    raise ValueError(f"no projection named {name!r}")


def our_catch_up(url: str, name: str, batch_size: int) -> tuple[float, float, int]:
    """Wall and CPU seconds our Worker takes to build one projection from position zero."""
    settings = Settings(database_url=url, projection_batch_size=batch_size)
    with opened(settings, projections=[projection_named(name)]) as system:
        runtime = system.runtime
        worker = runtime.worker()
        worker.prepare()
        started, started_cpu = time.perf_counter(), time.process_time()
        worker.run_until_caught_up(timeout=3600)
        seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        with runtime.reading(name) as (conn, tables):
            rows = sum(
                conn.execute(select(func.count()).select_from(table)).scalar_one()
                for table in tables.values()
            )
        return seconds, cpu, rows


def our_verify(url: str) -> tuple[float, float, int]:
    """Wall and CPU seconds ``audit verify`` takes over the whole store (the audit log built
    first, untimed, so verify compares with it as it would in service)."""
    with opened(Settings(database_url=url)) as system:
        runtime = system.runtime
        worker = runtime.worker(["audit_log"])
        worker.prepare()
        worker.run_until_caught_up(timeout=3600)
        for processor in worker.processors.values():
            processor.release()
        started, started_cpu = time.perf_counter(), time.process_time()
        report = verify_store(runtime)
        seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        if not report.ok:
            raise RuntimeError(f"verify failed on a generated store: {report.problem}")
        return seconds, cpu, report.events_checked


# -- memory while rebuilding -------------------------------------------------------------------


def rss_child(url: str, name: str, batch_size: int) -> None:
    """Run in a fresh process: rebuild one projection, print peak RSS (MB) as JSON."""
    head = _count(url)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds, _, _ = our_catch_up(url, name, batch_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"events": head, "before_mb": before, "peak_mb": peak, "seconds": seconds}))


def measure_rss(url: str, name: str, batch_size: int) -> dict[str, float]:
    result: dict[str, float] = _child("rss_child", url, name, batch_size)
    return result


def in_fresh_process(function: str, *args: Any) -> Any:
    """``function(*args)`` of this module, run in a new interpreter: each variant starts from
    the same state, with nothing another variant left behind (objects for the collector to
    walk, caches, warm pools)."""
    return _child("_print_result", function, *args)


def _print_result(function: str, *args: Any) -> None:
    print(json.dumps(globals()[function](*args)))


def _child(entry: str, *args: Any) -> Any:
    """Run ``entry(*args)`` of this module in a child process; the JSON of its last line."""
    code = (
        f"import json, sys; from benchmarks.projections import {entry}; "
        f"{entry}(*json.loads(sys.argv[1]))"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- live latency ------------------------------------------------------------------------------


@dataclass
class Latency:
    store: str
    commands: int
    seconds: float
    samples: list[float]

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


WRITER_THREADS = 4
"""Writers sharing the fixed schedule, so one slow commit does not hold back the next."""


def run_live_worker(url: str) -> None:
    """Run in a child process: a Worker for order_summaries until standard input closes."""
    settings = Settings(database_url=url)
    ledger = open_ledger(settings)
    runtime = open_read_models(settings, ledger, [OrderSummaryProjection()])
    worker = runtime.worker()
    worker.start()
    print("ready", flush=True)
    sys.stdin.read()
    worker.stop()
    runtime.close()
    ledger.close()


def live_latency(store: str, url: str, rate: float, seconds: float) -> Latency:
    """Place orders at ``rate`` per second while a Worker runs; time each until readable.

    The Worker runs in its own process (as ``orderledger`` runs it beside the API), so the
    writers and the checker here do not share its interpreter lock.
    """
    settings = Settings(database_url=url)
    ledger = open_ledger(settings)
    runtime = open_read_models(settings, ledger, [OrderSummaryProjection()])
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from benchmarks.projections import run_live_worker; "
            "run_live_worker(sys.argv[1])",
            url,
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    child.stdout.readline()  # "ready": the serving generation exists
    total = int(rate * seconds)
    placed: dict[int, tuple[str, float]] = {}
    samples: list[float] = []
    state = threading.Condition()
    next_index = 0
    started = time.perf_counter() + 0.1

    def write() -> None:
        nonlocal next_index
        while True:
            with state:
                index = next_index
                next_index += 1
            if index >= total:
                return
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            result = ledger.place_order(
                customer_id=f"live-{index % 50}",
                currency="EUR",
                lines=[{"sku": "SKU-LIVE", "quantity": 1, "unit_price": 1000}],
            )
            returned = time.perf_counter()
            with state:
                placed[index] = (str(result.order_id), returned)
                state.notify_all()

    def check() -> None:
        # One connection and one indexed query per poll, every 2 ms; each poll ends its
        # transaction so the next one sees what has committed since.
        with runtime.engine.connect() as conn:
            table = runtime.catalog.serving_tables(conn, "order_summaries")["order_summaries"]
            conn.rollback()
            query = select(table.c.order_id).where(table.c.order_id == bindparam("order_id"))
            for index in range(total):
                with state:
                    while index not in placed:
                        state.wait()
                    order_id, returned = placed[index]
                while True:
                    found = conn.execute(query, {"order_id": order_id}).first()
                    conn.rollback()
                    if found is not None:
                        break
                    time.sleep(0.002)
                samples.append(time.perf_counter() - returned)

    writers = [threading.Thread(target=write) for _ in range(WRITER_THREADS)]
    checker = threading.Thread(target=check)
    try:
        checker.start()
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        elapsed = time.perf_counter() - started
        checker.join()
    finally:
        child.stdin.close()
        child.wait(timeout=60)
        runtime.close()
        ledger.close()
    return Latency(store, total, elapsed, samples)


# -- the command -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--events", type=int, default=200_000, help="events in the catch-up store (200,000)"
    )
    parser.add_argument(
        "--baseline-events",
        type=int,
        default=20_000,
        help="events the library runner projects (20,000; it commits each on its own, so its "
        "rate is flat)",
    )
    parser.add_argument(
        "--projections",
        default="order_summaries,daily_sales,audit_log",
        help="our projections to time (comma-separated)",
    )
    parser.add_argument("--batch-size", type=int, default=ProcessorSettings().batch_size)
    parser.add_argument(
        "--stores", default=",".join(STORES), help="comma-separated: sqlite,postgres"
    )
    parser.add_argument(
        "--rss-events",
        type=int,
        default=1_000_000,
        help="events rebuilt in a child process for peak RSS, SQLite (0 skips)",
    )
    parser.add_argument("--rate", type=float, default=200.0, help="live commands per second")
    parser.add_argument(
        "--latency-seconds", type=float, default=10.0, help="live run length (0 skips)"
    )
    parser.add_argument(
        "--no-sealing",
        dest="sealing",
        action="store_false",
        help="skip timing order_summaries on a store with personal data in plain",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip timing audit verify against the order_summaries rebuild",
    )
    parser.add_argument("--markdown", action="store_true", help="tables as Markdown")


def run(args: argparse.Namespace) -> int:
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    names = [n.strip() for n in args.projections.split(",") if n.strip()]
    known = {p.name for p in all_projections()}
    for missing in [n for n in names if n not in known]:
        note(f"no projection {missing!r} in this build; skipped")
    names = [n for n in names if n in known]
    admin = postgres_admin_url()
    if "postgres" in stores and (reason := postgres_unreachable_reason(admin)):
        note(f"PostgreSQL skipped: {reason}")
        stores.remove("postgres")
    print_description(machine_description(admin if "postgres" in stores else None))
    console.print(
        f"[bold]command[/bold]: python -m benchmarks projections {' '.join(sys.argv[2:])}"
    )

    rows: list[list[str]] = []
    for store in stores:
        with (
            event_store(store, args.events, admin) as (url, recorded),
            event_store(store, args.events, admin, sealed=False) as (plain_url, _),
        ):
            baseline = min(args.baseline_events, recorded)
            # The library reads personal data only as it was given (it has no data keys).
            lib_wall, lib_cpu = in_fresh_process("library_catch_up", store, plain_url, baseline)
            lib_rate, lib_cpu_rate = baseline / lib_wall, baseline / lib_cpu
            rows.append(
                [
                    store,
                    "order_summaries",
                    LIBRARY,
                    f"{baseline:,} (first)",
                    f"{lib_wall:.2f}",
                    f"{lib_cpu:.2f}",
                    f"{lib_rate:,.0f}",
                    f"{lib_cpu_rate:,.0f}",
                    "1.0x",
                    "1.0x",
                ]
            )
            for name in names:
                wall, cpu, _ = in_fresh_process("our_catch_up", url, name, args.batch_size)
                rate = recorded / wall
                cpu_rate = recorded / cpu
                same = name == "order_summaries"
                ratio = f"{rate / lib_rate:.1f}x" if same else "-"
                cpu_ratio = f"{cpu_rate / lib_cpu_rate:.1f}x" if same else "-"
                rows.append(
                    [
                        store,
                        name,
                        OURS,
                        f"{recorded:,}",
                        f"{wall:.2f}",
                        f"{cpu:.2f}",
                        f"{rate:,.0f}",
                        f"{cpu_rate:,.0f}",
                        ratio,
                        cpu_ratio,
                    ]
                )
                console.print(f"{store} {name}: {rate:,.0f} events/s ({wall:.1f}s, cpu {cpu:.1f}s)")
            if args.sealing and "order_summaries" in names:
                wall, cpu, _ = in_fresh_process(
                    "our_catch_up", plain_url, "order_summaries", args.batch_size
                )
                plain_rate = recorded / wall
                sealed_row = next(
                    r for r in rows if r[0] == store and r[1] == "order_summaries" and r[2] == OURS
                )
                cost = 1 - float(sealed_row[6].replace(",", "")) / plain_rate
                rows.append(
                    [
                        store,
                        "order_summaries",
                        "personal data in plain",
                        f"{recorded:,}",
                        f"{wall:.2f}",
                        f"{cpu:.2f}",
                        f"{plain_rate:,.0f}",
                        f"{recorded / cpu:,.0f}",
                        f"sealing {cost:.1%}",
                        "-",
                    ]
                )
                console.print(f"{store} sealing costs catch-up {cost:.1%} (goal <= 15%)")
            if args.verify:
                wall, cpu, checked = in_fresh_process("our_verify", url)
                rate = checked / wall
                summaries = next(
                    (
                        r
                        for r in rows
                        if r[0] == store and r[1] == "order_summaries" and r[2] == OURS
                    ),
                    None,
                )
                versus = (
                    f"{rate / float(summaries[6].replace(',', '')):.2f}x rebuild"
                    if summaries
                    else "-"
                )
                rows.append(
                    [
                        store,
                        "audit verify",
                        OURS,
                        f"{checked:,}",
                        f"{wall:.2f}",
                        f"{cpu:.2f}",
                        f"{rate:,.0f}",
                        f"{checked / cpu:,.0f}",
                        versus,
                        "-",
                    ]
                )
                console.print(f"{store} verify: {rate:,.0f} events/s ({versus}; goal >= 0.5x)")
    print_table(
        f"Catch-up from position 0 (batch size {args.batch_size}; ratio = our events/s over "
        "the library ProjectionRunner's on the same store; the cpu columns count this "
        "process's CPU seconds only, leaving out waits for disk, locks and the server)",
        [
            "store",
            "projection",
            "variant",
            "events",
            "seconds",
            "cpu s",
            "events/s",
            "events/cpu-s",
            "ratio",
            "cpu ratio",
        ],
        rows,
        markdown=args.markdown,
    )

    if args.rss_events:
        rss_rows = []
        for events in sorted({min(args.events, args.rss_events), args.rss_events}):
            with event_store("sqlite", events, admin) as (url, _):
                for name in names:
                    result = measure_rss(url, name, args.batch_size)
                    rss_rows.append(
                        [
                            "sqlite",
                            name,
                            f"{result['events']:,.0f}",
                            f"{result['before_mb']:.0f}",
                            f"{result['peak_mb']:.0f}",
                            f"{result['seconds']:.1f}",
                        ]
                    )
        print_table(
            f"Peak RSS of a process rebuilding from position 0 (goal < {RSS_GOAL_MB:.0f} MB)",
            ["store", "projection", "events", "RSS before (MB)", "peak RSS (MB)", "seconds"],
            rss_rows,
            markdown=args.markdown,
        )

    if args.latency_seconds:
        latency_rows = []
        for store in stores:
            with temporary_store_url(store, admin) as url:
                live = live_latency(store, url, args.rate, args.latency_seconds)
            latency_rows.append(
                [
                    store,
                    "order_summaries",
                    f"{live.commands / live.seconds:,.0f}",
                    f"{len(live.samples):,}",
                    f"{live.percentile(0.5):.1f}",
                    f"{live.percentile(0.99):.1f}",
                    f"{max(live.samples) * 1000:.1f}",
                    f"{LATENCY_GOALS_MS[store]:.0f}",
                ]
            )
        print_table(
            "Live: place_order returned -> summary row readable (Worker in its own process, "
            f"{WRITER_THREADS} writer threads sharing a fixed schedule)",
            [
                "store",
                "projection",
                "commands/s",
                "samples",
                "p50 ms",
                "p99 ms",
                "max ms",
                "p99 goal ms",
            ],
            latency_rows,
            markdown=args.markdown,
        )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.projections")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
