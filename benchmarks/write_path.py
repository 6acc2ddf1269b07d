"""Write path: orders placed and paid per second, OrderLedger against a bare library Application.

One order is two commands and two events: ``place_order`` then ``capture_payment`` for the full
total, each saved on its own. The baseline is the library's own idiom for the same work: an
aggregate with the same two events and payloads, loaded from the repository before it is paid,
and one ``save()`` per command, on the library's own recorders.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any, Protocol
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import StoredEvent

from api.bootstrap import open_ledger, open_personal_data
from api.settings import Settings
from benchmarks.common import (
    STORES,
    Measurement,
    Timing,
    console,
    cpu_overhead,
    library_env,
    machine_description,
    note,
    overhead,
    paired_overhead,
    postgres_admin_url,
    postgres_unreachable_reason,
    print_description,
    print_table,
    rotated,
    temporary_store_url,
    timed,
)
from domain.eventstore import PostgresEventRecorder, SQLiteEventRecorder, event_store_env
from domain.ledger import OrderLedger
from domain.order import Order

OURS = "orderledger"
OURS_IDEMPOTENT = "orderledger + idempotency"
UNCHAINED = "orderledger, events unchained"
UNSEALED = "orderledger, personal data in plain"
BARE = "bare eventsourcing"
VARIANTS = (BARE, UNCHAINED, UNSEALED, OURS, OURS_IDEMPOTENT)
EVENTS_PER_ORDER = 2
GOAL = 0.15
CHAIN_GOAL = 0.10
"""Writing the hash chain costs at most this much of the orderledger variant's throughput."""
SEAL_GOAL = 0.10
"""Sealing personal data costs at most this much of it."""

LINES: list[dict[str, Any]] = [
    {"sku": "SKU-TEA-001", "quantity": 2, "unit_price": 1250},
    {"sku": "SKU-MUG-014", "quantity": 1, "unit_price": 899},
    {"sku": "SKU-SPOON-7", "quantity": 4, "unit_price": 150},
]
TOTAL = sum(line["quantity"] * line["unit_price"] for line in LINES)
SHIPPING_ADDRESS = "1 Example Street, 10115 Berlin, DE"


class BareOrder(Aggregate):
    """The same two events and payloads as Order, with no rules around them."""

    class Placed(Aggregate.Created):
        customer_id: str
        currency: str
        lines: list[dict[str, Any]]
        shipping_address: str | None
        client_reference: str | None

    class PaymentCaptured(Aggregate.Event):
        amount: int
        payment_reference: str

    @event(Placed)
    def __init__(
        self,
        customer_id: str,
        currency: str,
        lines: list[dict[str, Any]],
        shipping_address: str | None,
        client_reference: str | None,
    ) -> None:
        self.customer_id = customer_id
        self.currency = currency
        self.lines = lines
        self.shipping_address = shipping_address
        self.client_reference = client_reference
        self.captured = 0

    @event(PaymentCaptured)
    def capture_payment(self, amount: int, payment_reference: str) -> None:
        self.captured += amount


class BareOrders(Application[UUID]):
    """The library's idiom: create and save; get, change and save."""

    name = "BareOrders"

    def place_order(
        self,
        *,
        customer_id: str,
        currency: str,
        lines: list[dict[str, Any]],
        shipping_address: str | None,
        client_reference: str | None,
    ) -> UUID:
        order = BareOrder(
            customer_id=customer_id,
            currency=currency,
            lines=lines,
            shipping_address=shipping_address,
            client_reference=client_reference,
        )
        self.save(order)
        return order.id

    def capture_payment(self, order_id: UUID, *, amount: int, payment_reference: str) -> None:
        order: BareOrder = self.repository.get(order_id)
        order.capture_payment(amount=amount, payment_reference=payment_reference)
        self.save(order)


# -- one order, placed and paid, for each variant -------------------------------------------


class Workload(Protocol):
    def place_and_pay(self, number: int) -> None: ...

    def close(self) -> None: ...


class BareWorkload:
    def __init__(self, database_url: str) -> None:
        self.app = BareOrders(env=library_env(database_url))

    def place_and_pay(self, number: int) -> None:
        order_id = self.app.place_order(
            customer_id=f"customer-{number % 500:04d}",
            currency="EUR",
            lines=[dict(line) for line in LINES],
            shipping_address=SHIPPING_ADDRESS,
            client_reference=f"web-{number}",
        )
        self.app.capture_payment(order_id, amount=TOTAL, payment_reference=f"pay-{number}")

    def close(self) -> None:
        self.app.close()


class UnchainedSQLiteRecorder(SQLiteEventRecorder):
    """Our recorder with nothing linked: the baseline the chain's cost is measured against."""

    def links(self, stored_events: Sequence[StoredEvent], previous: Any) -> list[bytes | None]:
        return [None] * len(stored_events)


class UnchainedPostgresRecorder(PostgresEventRecorder):
    def links(self, stored_events: Sequence[StoredEvent], previous: Any) -> list[bytes | None]:
        return [None] * len(stored_events)


def unchained_ledger(database_url: str) -> OrderLedger:
    env = event_store_env(database_url)
    recorder = (
        "UnchainedSQLiteRecorder"
        if database_url.startswith("sqlite")
        else ("UnchainedPostgresRecorder")
    )
    env["APPLICATION_RECORDER_TOPIC"] = f"{__name__}:{recorder}"
    return OrderLedger(env=env, personal=open_personal_data(Settings(database_url=database_url)))


class UnsealedLedger(OrderLedger):
    """Our ledger storing personal values as they come: the baseline sealing is measured
    against (never a product path: the product always seals)."""

    name = OrderLedger.name  # the library names the events table after the application

    def seal(self, order: Order) -> None:
        return None


def unsealed_ledger(database_url: str) -> OrderLedger:
    settings = Settings(database_url=database_url)
    return UnsealedLedger(env=event_store_env(database_url), personal=open_personal_data(settings))


class LedgerWorkload:
    def __init__(
        self, database_url: str, *, idempotent: bool, chained: bool = True, sealed: bool = True
    ) -> None:
        if not chained:
            self.ledger = unchained_ledger(database_url)
        elif not sealed:
            self.ledger = unsealed_ledger(database_url)
        else:
            self.ledger = open_ledger(Settings(database_url=database_url))
        self.idempotent = idempotent
        # Fresh per workload, so keys never collide with an earlier run's.
        self.run = uuid.uuid4().hex[:8]

    def place_and_pay(self, number: int) -> None:
        keys = (
            (f"{self.run}-place-{number}", f"{self.run}-pay-{number}")
            if self.idempotent
            else (None, None)
        )
        placed = self.ledger.place_order(
            customer_id=f"customer-{number % 500:04d}",
            currency="EUR",
            lines=LINES,
            shipping_address=SHIPPING_ADDRESS,
            client_reference=f"web-{number}",
            idempotency_key=keys[0],
        )
        self.ledger.capture_payment(
            placed.order_id,
            amount=TOTAL,
            payment_reference=f"pay-{number}",
            idempotency_key=keys[1],
        )

    def close(self) -> None:
        self.ledger.close()


WORKLOADS: dict[str, Callable[[str], Workload]] = {
    BARE: BareWorkload,
    UNCHAINED: lambda url: LedgerWorkload(url, idempotent=False, chained=False),
    UNSEALED: lambda url: LedgerWorkload(url, idempotent=False, sealed=False),
    OURS: lambda url: LedgerWorkload(url, idempotent=False),
    OURS_IDEMPOTENT: lambda url: LedgerWorkload(url, idempotent=True),
}


@contextmanager
def opened(variant: str, database_url: str) -> Iterator[Workload]:
    workload = WORKLOADS[variant](database_url)
    try:
        yield workload
    finally:
        workload.close()


def place_and_pay_all(workload: Workload, numbers: range) -> None:
    for number in numbers:
        workload.place_and_pay(number)


def measure_interleaved(
    store: str, orders: int, warmup: int, block: int
) -> dict[str, list[Timing]]:
    """Time every variant on its own fresh store, taking turns a block of orders at a time.

    Taking turns spreads any slow patch of a shared machine over all variants alike, instead
    of landing on whichever variant happened to run then.
    """
    with ExitStack() as stack:
        workloads = {
            variant: stack.enter_context(
                opened(variant, stack.enter_context(temporary_store_url(store)))
            )
            for variant in VARIANTS
        }
        for workload in workloads.values():
            place_and_pay_all(workload, range(warmup))
        blocks: dict[str, list[Timing]] = {variant: [] for variant in VARIANTS}
        gc.collect()
        for turn, first in enumerate(range(warmup, warmup + orders, block)):
            numbers = range(first, min(first + block, warmup + orders))
            for variant in rotated(VARIANTS, turn):
                blocks[variant].append(
                    timed(partial(place_and_pay_all, workloads[variant], numbers))
                )
        return blocks


# -- the command ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--orders", type=int, default=2000, help="orders per run on SQLite (default 2000)"
    )
    parser.add_argument(
        "--pg-orders",
        type=int,
        default=2000,
        help="orders per run on PostgreSQL (default 2000, the same mix of customers as SQLite)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per variant; the best is reported (default 3)"
    )
    parser.add_argument(
        "--warmup", type=int, default=100, help="untimed orders before each run (default 100)"
    )
    parser.add_argument(
        "--block",
        type=int,
        default=20,
        help="orders each variant runs before the next takes its turn (default 20)",
    )
    parser.add_argument(
        "--store",
        choices=[*STORES, "all"],
        default="all",
        help="which store to measure (default all)",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print the result table as Markdown"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing, profile the orderledger variant and print where time goes",
    )


def run(args: argparse.Namespace) -> int:
    for name in ("orders", "pg_orders", "repeat", "block"):
        if getattr(args, name) < 1:
            console.print(f"--{name.replace('_', '-')} must be 1 or more")
            return 2
    if args.warmup < 0:
        console.print("--warmup must be 0 or more")
        return 2
    stores = list(STORES) if args.store == "all" else [args.store]
    postgres_admin: str | None = None
    if "postgres" in stores:
        postgres_admin = postgres_admin_url()
        reason = postgres_unreachable_reason(postgres_admin)
        if reason is not None:
            note(f"PostgreSQL skipped: {postgres_admin} is unreachable ({reason})")
            stores.remove("postgres")
            postgres_admin = None
    print_description(machine_description(postgres_admin))
    if args.profile:
        for store in stores:
            orders = args.orders if store == "sqlite" else args.pg_orders
            profile(store, orders, args.warmup)
        return 0

    measurements = {
        (store, variant): Measurement(
            store=store,
            variant=variant,
            orders=args.orders if store == "sqlite" else args.pg_orders,
            events_per_order=EVENTS_PER_ORDER,
        )
        for store in stores
        for variant in VARIANTS
    }
    for repeat in range(args.repeat):
        for store in stores:
            orders = args.orders if store == "sqlite" else args.pg_orders
            blocks = measure_interleaved(store, orders, args.warmup, args.block)
            for variant, timings in blocks.items():
                measurements[store, variant].add_run(timings)
            console.print(
                f"  run {repeat + 1}/{args.repeat} {store:8} "
                + "  ".join(
                    f"{variant}: {orders / measurements[store, variant].runs[-1].wall:,.0f}/s"
                    for variant in VARIANTS
                ),
                style="dim",
            )
    report(stores, measurements, args.repeat, markdown=args.markdown)
    return 0


def report(
    stores: list[str],
    measurements: dict[tuple[str, str], Measurement],
    repeat: int,
    *,
    markdown: bool = False,
) -> None:
    rows = []
    for store in stores:
        bare = measurements[store, BARE]
        for variant in VARIANTS:
            m = measurements[store, variant]
            rows.append(
                [
                    store,
                    variant,
                    f"{m.orders:,}",
                    f"{m.seconds:.3f}",
                    f"{m.cpu_seconds:.3f}",
                    f"{m.orders_per_second:,.0f}",
                    f"{m.events_per_second:,.0f}",
                    "-" if variant == BARE else f"{paired_overhead(bare, m):.1%}",
                    f"{paired_overhead(measurements[store, UNCHAINED], m):.1%}"
                    if variant in (OURS, OURS_IDEMPOTENT)
                    else "-",
                    f"{paired_overhead(measurements[store, UNSEALED], m):.1%}"
                    if variant == OURS
                    else "-",
                    "-" if variant == BARE else f"{overhead(bare, m):.1%}",
                    "-" if variant == BARE else f"{cpu_overhead(bare, m):.1%}",
                    f"{m.spread:.1%}",
                ]
            )
    print_table(
        f"Write path: orders placed and paid (best of {repeat})",
        [
            "store",
            "variant",
            "orders",
            "seconds",
            "cpu s",
            "orders/s",
            "events/s",
            "overhead",
            "chain ovh",
            "seal ovh",
            "best-run ovh",
            "cpu ovh",
            "spread",
        ],
        rows,
        markdown=markdown,
    )
    blocks = len(measurements[stores[0], BARE].blocks) if stores else 0
    console.print(
        "overhead = (bare - ours) / bare orders/s, the median over blocks run side by side "
        f"({blocks} pairs on {stores[0] if stores else '-'}); chain ovh = the same against "
        "our own variant with the hash chain left out; seal ovh = against our own variant "
        "storing personal data in plain; best-run ovh = the same from the "
        "best runs' totals; cpu ovh = the same from this process's CPU time (leaves out waiting "
        "for the disk and PostgreSQL); spread = slowest run / fastest - 1; seconds, orders/s "
        "and events/s are the best run's; events/s counts the 2 order events (the idempotent "
        "variant also writes 1 key row per command)."
    )
    for store in stores:
        ours = paired_overhead(measurements[store, BARE], measurements[store, OURS])
        verdict = "within" if ours <= GOAL else "ABOVE"
        console.print(f"{store}: orderledger overhead {ours:.1%}, {verdict} the {GOAL:.0%} goal")
        chain = paired_overhead(measurements[store, UNCHAINED], measurements[store, OURS])
        verdict = "within" if chain <= CHAIN_GOAL else "ABOVE"
        console.print(
            f"{store}: the hash chain costs {chain:.1%}, {verdict} the {CHAIN_GOAL:.0%} goal"
        )
        seal = paired_overhead(measurements[store, UNSEALED], measurements[store, OURS])
        verdict = "within" if seal <= SEAL_GOAL else "ABOVE"
        console.print(
            f"{store}: sealing personal data costs {seal:.1%}, {verdict} the {SEAL_GOAL:.0%} goal"
        )


def profile(store: str, orders: int, warmup: int) -> None:
    """Where the orderledger variant spends its time, by cumulative and own time."""
    with temporary_store_url(store) as url, opened(OURS, url) as workload:
        for number in range(warmup):
            workload.place_and_pay(number)
        profiler = cProfile.Profile()
        profiler.enable()
        for number in range(warmup, warmup + orders):
            workload.place_and_pay(number)
        profiler.disable()
    for sort in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(sort).print_stats(30)
        console.print(f"[bold]{store}: {orders} orders, by {sort}[/bold]")
        console.print(out.getvalue(), markup=False)
