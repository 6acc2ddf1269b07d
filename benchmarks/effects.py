"""Side effects: what recording them costs the projection catch-up, and delivery throughput.

Recording: a store whose outbox was installed while it was empty, with one webhook subscription
to every event type, is filled with real OrderLedger events (every order with a customer email);
fresh copies of it are caught up from position 0 by a Worker running ``order_summaries`` alone,
the ``outbox`` alone, and both. Delivery: a store holding pending webhook effects is drained
by the Dispatcher at several concurrencies into a receiver answering 204 from its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import httpx
from sqlalchemy import func, select

from api import bootstrap
from api.bootstrap import build_dispatcher
from api.settings import Settings
from benchmarks.common import (
    STORES,
    Timing,
    console,
    machine_description,
    note,
    postgres_admin_url,
    postgres_template_copy,
    postgres_unreachable_reason,
    print_description,
    print_table,
    rotated,
    sqlite_file_copy,
    temporary_store_url,
    timed,
)
from domain.ledger import OrderLedger
from domain.order import Order
from projections.base import Projection
from projections.effects.dispatcher import DispatchSettings
from projections.effects.outbox import OutboxProjection, effects
from projections.effects.senders import SmtpSettings
from projections.effects.service import Effects
from projections.effects.targets import TargetPolicy, parse_networks
from projections.engine.runtime import ProjectionRuntime
from projections.order_summaries import OrderSummaryProjection

SAVE_CHUNK = 500
"""Orders per ``ledger.save``: one transaction each."""
VARIANTS: dict[str, tuple[str, ...]] = {
    "order_summaries": ("order_summaries",),
    "outbox": ("outbox",),
    "order_summaries + outbox": ("order_summaries", "outbox"),
}
CONCURRENCIES = (1, 8, 32)
RECEIVER_PATH = "/hooks/orders"

LOCAL = TargetPolicy(parse_networks("127.0.0.0/8"))
"""The benchmark's receiver listens on this machine."""


# -- generating real events fast -----------------------------------------------------------------


def _order(index: int, *, with_email: bool) -> Order:
    """One order with a realistic life (as in the projections benchmark), maybe with an email."""
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
        customer_email=f"customer-{index % 5003:05d}@example.com" if with_email else None,
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


def fill_store(ledger: OrderLedger, events: int, *, with_email: bool) -> int:
    """Record at least ``events`` events, many orders per transaction; the events recorded."""
    recorded = index = 0
    while recorded < events:
        chunk: list[Order] = []
        while recorded < events and len(chunk) < SAVE_CHUNK:
            order = _order(index, with_email=with_email)
            index += 1
            recorded += len(order.pending_events)
            chunk.append(order)
        ledger.save(*chunk)
    return recorded


def projections_named(names: Sequence[str]) -> list[Projection]:
    known: dict[str, Callable[[], Projection]] = {
        "order_summaries": OrderSummaryProjection,
        "outbox": OutboxProjection,
    }
    return [known[name]() for name in names]


@contextmanager
def opened(url: str, names: Sequence[str]) -> Iterator[tuple[OrderLedger, ProjectionRuntime]]:
    settings = Settings(database_url=url)
    with bootstrap.opened(settings, projections=projections_named(names)) as system:
        yield system.ledger, system.runtime


def seeded_store(url: str, events: int, *, receiver: str, with_email: bool) -> int:
    """Install the outbox on the empty store, subscribe to everything, then record events.

    The outbox records effects only for events after it was installed, and a subscription only
    for events after it was added, so both come first.
    """
    with opened(url, ["outbox"]) as (ledger, runtime):
        Effects(runtime.engine, runtime.source, LOCAL).add_subscription(receiver, ["*"])
        started = time.perf_counter()
        recorded = fill_store(ledger, events, with_email=with_email)
        seconds = time.perf_counter() - started
    note(f"generated {recorded:,} events in {seconds:.1f}s ({recorded / seconds:,.0f}/s)")
    return recorded


@contextmanager
def store_copy(store: str, url: str, admin: str) -> Iterator[str]:
    """A fresh copy of a store no one has open (SQLite file copy, PostgreSQL template)."""
    if store == "sqlite":
        with sqlite_file_copy(url.split(":///", 1)[1]) as copy:
            yield copy
    else:
        with postgres_template_copy(admin, urlsplit(url).path.lstrip("/")) as copy:
            yield copy


def effect_counts(runtime: ProjectionRuntime) -> dict[str, int]:
    """Outbox rows by kind (webhook, email)."""
    with runtime.engine.connect() as conn:
        rows = conn.execute(select(effects.c.kind, func.count()).group_by(effects.c.kind))
        return {row[0]: int(row[1]) for row in rows}


# -- recording: catch-up with and without the outbox --------------------------------------------


@dataclass
class CatchUp:
    store: str
    variant: str
    events: int
    runs: list[Timing]
    effects: dict[str, int]

    @property
    def best(self) -> Timing:
        return min(self.runs, key=lambda run: run.wall)

    @property
    def rate(self) -> float:
        return self.events / self.best.wall


def catch_up(url: str, names: Sequence[str]) -> tuple[Timing, dict[str, int]]:
    """Time a Worker for the named projections from position 0 to the head."""
    with opened(url, names) as (_, runtime):
        worker = runtime.worker(only=list(names))
        worker.prepare()
        timing = timed(lambda: worker.run_until_caught_up(timeout=3600))
        for name in names:
            row = next(r for r in runtime.catalog.rows(name) if r.role == "serving")
            if row.failed or row.position < runtime.source.head():
                raise RuntimeError(f"{name} did not catch up: {row}")
        return timing, effect_counts(runtime)


def measure_recording(
    store: str, events: int, rounds: int, admin: str
) -> tuple[list[CatchUp], int]:
    results = {name: CatchUp(store, name, 0, [], {}) for name in VARIANTS}
    with temporary_store_url(store, admin) as base:
        recorded = seeded_store(
            base, events, receiver="http://127.0.0.1:9/hooks/orders", with_email=True
        )
        for round_ in range(rounds):
            # A different variant goes first each round, so none always meets a cold cache.
            for variant in rotated(list(VARIANTS), round_):
                with store_copy(store, base, admin) as url:
                    timing, counts = catch_up(url, VARIANTS[variant])
                result = results[variant]
                result.events, result.effects = recorded, counts
                result.runs.append(timing)
                console.print(
                    f"{store} {variant}: {recorded / timing.wall:,.0f} events/s "
                    f"({timing.wall:.1f}s, cpu {timing.cpu:.1f}s) effects {counts}"
                )
    return list(results.values()), recorded


# -- delivery ------------------------------------------------------------------------------------


class ReceiverProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, just enough of it: 204 to every POST, the count of POSTs to a GET.

    Far lighter than a full server, so the receiver is never what the dispatcher waits for.
    """

    received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return  # the rest of the body is still on its way
            self.buffer = self.buffer[end + 4 + length :]
            if head[0].startswith("POST "):
                ReceiverProtocol.received += 1
                self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            else:
                body = str(ReceiverProtocol.received).encode()
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )


def serve_receiver(port: int) -> None:
    """Run in its own process, so the receiver never competes for the dispatcher's GIL."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(ReceiverProtocol, "127.0.0.1", port, backlog=256)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


@contextmanager
def receiver() -> Iterator[str]:
    """A loopback webhook receiver in a child process; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from benchmarks.effects import serve_receiver; serve_receiver({port})",
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/count", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or child.poll() is not None:
                    raise RuntimeError("the webhook receiver did not start") from None
                time.sleep(0.1)
        yield base + RECEIVER_PATH
    finally:
        child.terminate()
        child.wait(timeout=10)


def received(url: str) -> int:
    parts = urlsplit(url)
    return int(httpx.get(f"{parts.scheme}://{parts.netloc}/count", timeout=5).text)


@dataclass
class Delivery:
    store: str
    variant: str
    concurrency: int
    effects: int
    timing: Timing
    received: int
    delivered: int

    @property
    def rate(self) -> float:
        return self.effects / self.timing.wall


def receiver_ceiling(url: str, posts: int, concurrency: int) -> Delivery:
    """Bare httpx POSTs of a webhook-sized body from N threads: what the receiver can take."""
    body = b'{"data":{},"id":"x"}' + b" " * 600
    before = received(url)
    with httpx.Client(limits=httpx.Limits(max_connections=concurrency)) as client:

        def post(_: int) -> None:
            client.post(url, content=body).raise_for_status()

        with ThreadPoolExecutor(concurrency) as pool:
            timing = timed(lambda: list(pool.map(post, range(posts))))
    got = received(url) - before
    return Delivery("-", "httpx alone (no store)", concurrency, posts, timing, got, got)


def deliver_all(url: str, target: str, concurrency: int) -> Delivery:
    """Time the Dispatcher draining every pending effect of a store copy."""
    with opened(url, ["outbox"]) as (_ledger, runtime):
        service = Effects(runtime.engine, runtime.source, LOCAL)
        pending = service.counts()["pending"]
        dispatcher = build_dispatcher(
            runtime,
            dispatch=DispatchSettings(concurrency=concurrency, per_target=concurrency),
            smtp=SmtpSettings(),
            timeout=10.0,
            targets=LOCAL,
            owner=f"bench-{concurrency}",
        )
        before = received(target)
        try:

            def drain() -> None:
                deadline = time.monotonic() + 3600
                while service.counts()["pending"] and time.monotonic() < deadline:
                    dispatcher.drain(timeout=3600)

            timing = timed(drain)
        finally:
            dispatcher.stop()
        counts = service.counts()
    store = "sqlite" if url.startswith("sqlite") else "postgres"
    if counts["pending"] or counts["dead"]:
        raise RuntimeError(f"not every effect was delivered: {counts}")
    return Delivery(
        store,
        "Dispatcher",
        concurrency,
        pending,
        timing,
        received(target) - before,
        counts["delivered"],
    )


def measure_delivery(store: str, deliveries: int, target: str, admin: str) -> list[Delivery]:
    results = []
    with temporary_store_url(store, admin) as base:
        seeded_store(base, deliveries, receiver=target, with_email=False)
        # Record the effects once; every concurrency gets a copy with all of them pending.
        with opened(base, ["outbox"]) as (_, runtime):
            runtime.worker(only=["outbox"]).run_until_caught_up(timeout=3600)
            note(f"{store}: {effect_counts(runtime)} effects pending")
        for concurrency in CONCURRENCIES:
            with store_copy(store, base, admin) as url:
                result = deliver_all(url, target, concurrency)
            console.print(
                f"{store} concurrency {concurrency}: {result.rate:,.0f} deliveries/s "
                f"({result.timing.wall:.1f}s, cpu {result.timing.cpu:.1f}s)"
            )
            results.append(result)
    return results


# -- the command ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--events", type=int, default=100_000, help="events caught up on SQLite (100,000)"
    )
    parser.add_argument(
        "--postgres-events", type=int, default=50_000, help="events caught up on PostgreSQL"
    )
    parser.add_argument(
        "--deliveries", type=int, default=5_000, help="pending webhooks per run on SQLite"
    )
    parser.add_argument(
        "--postgres-deliveries", type=int, default=2_000, help="pending webhooks on PostgreSQL"
    )
    parser.add_argument("--rounds", type=int, default=2, help="catch-up runs of each variant")
    parser.add_argument(
        "--stores", default=",".join(STORES), help="comma-separated: sqlite,postgres"
    )
    parser.add_argument("--markdown", action="store_true", help="tables as Markdown")


def run(args: argparse.Namespace) -> int:
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    admin = postgres_admin_url()
    if "postgres" in stores and (reason := postgres_unreachable_reason(admin)):
        note(f"PostgreSQL skipped: {reason}")
        stores.remove("postgres")
    print_description(machine_description(admin if "postgres" in stores else None))
    console.print(f"[bold]command[/bold]: python -m benchmarks effects {' '.join(sys.argv[2:])}")
    sizes = {"sqlite": args.events, "postgres": args.postgres_events}
    deliveries = {"sqlite": args.deliveries, "postgres": args.postgres_deliveries}

    rows: list[list[str]] = []
    for store in stores:
        results, _ = measure_recording(store, sizes[store], args.rounds, admin)
        alone = results[0]
        for result in results:
            cost = 1 - result.rate / alone.rate
            extra = (result.best.wall - alone.best.wall) / result.events * 1e6
            recorded = sum(result.effects.values())
            rows.append(
                [
                    store,
                    result.variant,
                    f"{result.events:,}",
                    f"{result.best.wall:.2f}",
                    f"{result.best.cpu:.2f}",
                    f"{result.rate:,.0f}",
                    f"{result.events / result.best.cpu:,.0f}",
                    f"{recorded:,}" if recorded else "-",
                    "-" if result is alone else f"{cost:.0%}",
                    "-" if result is alone else f"{extra:+.0f}",
                ]
            )
    print_table(
        "Catch-up from position 0, with and without recording effects (one webhook "
        "subscription to every event type, an email address on every order; best of "
        f"{args.rounds} runs)",
        [
            "store",
            "projections",
            "events",
            "seconds",
            "cpu s",
            "events/s",
            "events/cpu-s",
            "effects",
            "rate lost",
            "+µs/event",
        ],
        rows,
        markdown=args.markdown,
    )

    delivery_rows: list[list[str]] = []
    with receiver() as target:
        sent = [
            receiver_ceiling(target, max(deliveries[s] for s in stores), concurrency)
            for concurrency in CONCURRENCIES
        ]
        for store in stores:
            sent.extend(measure_delivery(store, deliveries[store], target, admin))
    for delivery in sent:
        delivery_rows.append(
            [
                delivery.store,
                delivery.variant,
                str(delivery.concurrency),
                f"{delivery.effects:,}",
                f"{delivery.timing.wall:.2f}",
                f"{delivery.timing.cpu:.2f}",
                f"{delivery.rate:,.0f}",
                f"{delivery.effects / delivery.timing.cpu:,.0f}",
                f"{delivery.received:,}",
            ]
        )
    print_table(
        "Webhook delivery to a loopback receiver answering 204 (its own process); "
        "concurrency = DispatchSettings(concurrency=N, per_target=N)",
        [
            "store",
            "sender",
            "concurrency",
            "effects",
            "seconds",
            "cpu s",
            "deliveries/s",
            "per cpu-s",
            "received",
        ],
        delivery_rows,
        markdown=args.markdown,
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.effects")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
