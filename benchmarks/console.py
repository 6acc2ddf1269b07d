"""Console pages: server time of each page with 1,000,000 orders in the read models.

Real orders go through the ledger and the projections; the read models are then filled up to
``--orders`` order summaries, as many audit-log entries and as many outbox effects with copies
of those rows (new ids, customers, statuses and times), since recording a million orders one
command at a time would take this machine most of an hour and the pages read only the read
models. Each page is asked
for ``--repeat`` times by a signed-in admin through the app in this process (TestClient: no
network); the time is the request's round trip through the whole ASGI app. Goal: every page
≤ 100 ms at the 95th percentile.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, Table, func, insert, select

from api.bootstrap import opened
from api.http.app import create_app
from api.key_store import ApiKeyStore, Role
from api.settings import Settings
from benchmarks.common import (
    console,
    machine_description,
    note,
    postgres_admin_url,
    postgres_unreachable_reason,
    print_description,
    print_table,
    temporary_store_url,
)
from projections.audit_log import NAME as AUDIT_LOG
from projections.effects.outbox import effects as outbox_effects

GOAL_MS = 100.0
REAL_ORDERS = 200
CHUNK = 20_000
STATUSES = ("pending_payment", "partially_paid", "paid", "shipped", "delivered", "cancelled")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--orders", type=int, default=1_000_000, help="orders in the read models")
    parser.add_argument("--repeat", type=int, default=30, help="requests per page (default 30)")
    parser.add_argument("--stores", default="sqlite", help="comma-separated: sqlite,postgres")
    parser.add_argument("--markdown", action="store_true", help="tables as Markdown")


def _record_real_orders(settings: Settings) -> None:
    with opened(settings) as system:
        for number in range(REAL_ORDERS):
            placed = system.ledger.place_order(
                customer_id=f"cust-{number % 40}",
                currency="EUR",
                lines=[{"sku": f"SKU-{number % 7}", "quantity": 1 + number % 3, "unit_price": 990}],
                customer_email=f"c{number}@example.com",
            )
            if number % 2:
                system.ledger.capture_payment(
                    placed.order_id, amount=990, payment_reference=f"p-{number}"
                )
        system.runtime.worker().run_until_caught_up(timeout=600)


def _fill(engine: Engine, table: Table, total: int, vary: Any) -> None:
    """Copy the table's rows until it holds ``total``; ``vary(row, n)`` makes copy n."""
    with engine.connect() as conn:
        seeds = [dict(row._mapping) for row in conn.execute(select(table))]
        have = int(conn.execute(select(func.count()).select_from(table)).scalar_one())
    made = have
    while made < total:
        count = min(CHUNK, total - made)
        rows = [vary(dict(seeds[(made + n) % len(seeds)]), made + n) for n in range(count)]
        with engine.begin() as conn:
            conn.execute(insert(table), rows)
        made += count


def _summary(row: dict[str, Any], n: int) -> dict[str, Any]:
    row["order_id"] = str(uuid.UUID(int=n + 1))
    row["customer_id"] = f"cust-{n % 50_000}"
    row["status"] = STATUSES[n % len(STATUSES)]
    row["placed_at"] = row["placed_at"] - timedelta(minutes=n % 525_600)
    return row


def _effect(row: dict[str, Any], n: int) -> dict[str, Any]:
    row["id"] = str(uuid.UUID(int=n + 1))
    row["position"] = 10_000_000 + n
    row["order_id"] = str(uuid.UUID(int=n + 1))
    # Most delivered, some pending, a few dead, as a live outbox holds them.
    row["status"] = "dead" if n % 1000 == 0 else "pending" if n % 50 == 0 else "delivered"
    return row


def _audit_entry(row: dict[str, Any], n: int) -> dict[str, Any]:
    row["position"] = 10_000_000 + n
    row["order_id"] = str(uuid.UUID(int=n + 1))
    row["event_id"] = uuid.UUID(int=n + 1).hex
    row["tx_id"] = 2**40 + n
    return row


@contextmanager
def _store(store: str, orders: int, admin: str) -> Iterator[tuple[str, Settings]]:
    with temporary_store_url(store, admin) as url:
        settings = Settings(database_url=url, run_projections=False, run_effects=False)
        _record_real_orders(settings)
        with opened(settings) as system:
            runtime = system.runtime
            with runtime.engine.connect() as conn:
                summaries = runtime.catalog.serving_tables(conn, "order_summaries")
                audit = runtime.catalog.serving_tables(conn, AUDIT_LOG)
            started = time.perf_counter()
            _fill(runtime.engine, summaries["order_summaries"], orders, _summary)
            _fill(runtime.engine, audit["audit_log"], orders, _audit_entry)
            _fill(runtime.engine, outbox_effects, orders, _effect)
            note(
                f"{store}: read models filled to {orders:,} orders in "
                f"{time.perf_counter() - started:.0f} s"
            )
        yield url, settings


def _pages(order_id: str) -> list[tuple[str, str]]:
    return [
        ("orders, newest first", "/console/orders"),
        ("orders by status", "/console/orders?status=shipped"),
        ("orders by customer", "/console/orders?customer_id=cust-4242"),
        ("orders by date", "/console/orders?placed_from=2026-01-01&to=2026-02-01"),
        ("one order's timeline", f"/console/orders/{order_id}"),
        ("projections", "/console/projections"),
        ("effects", "/console/effects"),
        ("audit log", "/console/audit"),
    ]


def _time_pages(settings: Settings, repeat: int) -> list[tuple[str, float, float]]:
    keys = ApiKeyStore.from_url(settings.database_url)
    try:
        token = keys.create(Role.admin, "console benchmark").token
    finally:
        keys.close()
    results = []
    with TestClient(create_app(settings)) as client:
        signed = client.post("/console/sign-in", data={"api_key": token}, follow_redirects=False)
        assert signed.status_code == 303, signed.text
        listing = client.get("/console/orders?customer_id=cust-1")
        found = listing.text.split('href="/console/orders/', 1)[1].split('"', 1)[0]
        for name, path in _pages(found):
            times = []
            for _ in range(repeat + 3):
                started = time.perf_counter()
                response = client.get(path)
                times.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    raise RuntimeError(f"{path} answered {response.status_code}")
            times = sorted(times[3:])  # the first requests warm caches up
            p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
            results.append((name, statistics.median(times), p95))
    return results


def run(args: argparse.Namespace) -> int:
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    admin = postgres_admin_url()
    if "postgres" in stores and (reason := postgres_unreachable_reason(admin)):
        note(f"PostgreSQL skipped: {reason}")
        stores.remove("postgres")
    print_description(machine_description(admin if "postgres" in stores else None))
    rows = []
    worst = 0.0
    for store in stores:
        with _store(store, args.orders, admin) as (_, settings):
            for name, p50, p95 in _time_pages(settings, args.repeat):
                worst = max(worst, p95)
                rows.append([store, name, f"{p50:.1f}", f"{p95:.1f}"])
    print_table(
        f"Console pages with {args.orders:,} orders, ms per request",
        ["store", "page", "p50", "p95"],
        rows,
        markdown=args.markdown,
    )
    console.print(
        f"slowest page p95 {worst:.1f} ms (goal {GOAL_MS:g} ms): "
        + ("[green]met[/green]" if worst <= GOAL_MS else "[red]not met[/red]")
    )
    return 0
