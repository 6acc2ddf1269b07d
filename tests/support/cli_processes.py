"""Helpers for tests that run projection workers as real processes and kill them.

Test data is real but fast: orders are built in memory with the aggregate's own commands and
saved several hundred at a time through the ledger (the library's encoding and recorder, one
transaction per save). Figures to check read models against are read back from the store.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic
from sqlalchemy import func, select

from api.bootstrap import opened
from api.settings import Settings
from domain.ledger import OrderLedger
from domain.order import EVENT_TYPES, Order
from projections.engine.catalog import BUILDING, SERVING, Generation
from projections.engine.runtime import ProjectionRuntime
from tests import LOCAL_RECEIVERS, REPO_ROOT
from tests.support.projections import checksum, table_contents
from tests.support.waiting import wait_for

PROCESS_TIMEOUT = 180.0
"""Longest a child process or a condition on it may take, even on a loaded machine."""

_SKUS = {
    "TEA-SENCHA-100G": 1250,
    "MUG-STONEWARE": 2490,
    "KETTLE-CAST-IRON": 8900,
    "WHISK-BAMBOO": 1599,
    "FILTER-PAPER-100": 399,
    "TRAY-WALNUT": 4500,
}
_CUSTOMERS = ("cust-alice", "cust-bruno", "cust-chiyo", "cust-dmitri", "cust-eleanor")
_CURRENCIES = ("EUR", "USD", "GBP")


# -- test data ------------------------------------------------------------------------------


def _one_order(rng: random.Random, serial: int) -> Order:
    """An order taken through one of several stories, entirely in memory."""
    skus = rng.sample(sorted(_SKUS), rng.randint(1, 3))
    order = Order.place(
        customer_id=rng.choice(_CUSTOMERS),
        currency=rng.choice(_CURRENCIES),
        lines=[{"sku": s, "quantity": rng.randint(1, 4), "unit_price": _SKUS[s]} for s in skus],
    )
    story = rng.randrange(6)
    if story == 0:
        return order
    if story == 1:
        spare = next(s for s in sorted(_SKUS) if s not in order.lines)
        order.add_line(sku=spare, quantity=1, unit_price=_SKUS[spare])
        order.cancel(reason="changed my mind")
        return order
    part = max(1, order.total // 3)
    order.capture_payment(amount=part, payment_reference=f"p{serial}-1")
    if story == 2:
        return order
    if story == 3:
        order.cancel(reason="out of stock")
        order.issue_refund(amount=part, reason="cancelled")
        return order
    order.capture_payment(amount=order.total - part, payment_reference=f"p{serial}-2")
    order.ship(carrier="DHL", tracking_number=f"T{serial}")
    if story == 5:
        order.deliver()
        order.issue_refund(amount=max(1, part // 2), reason="goodwill")
    return order


def generate_orders(
    ledger: OrderLedger, *, events: int, seed: int, per_save: int = 500, serial: int = 0
) -> int:
    """Record orders until at least ``events`` new events are in the store; return the head.

    ``serial`` keeps payment references unique when a test generates several times.
    """
    rng = random.Random(seed)
    recorded = 0
    while recorded < events:
        orders = []
        for _ in range(per_save):
            orders.append(_one_order(rng, serial))
            serial += 1
        recorded += sum(len(order.pending_events) for order in orders)
        ledger.save(*orders)
    return ledger.head_position()


@dataclass(frozen=True)
class Figures:
    """Order counts and money totals, either from the store or from order_summaries."""

    orders: int
    captured: int
    refunded: int
    cancelled: int
    shipped: int


def store_figures(ledger: OrderLedger, page: int = 2000) -> Figures:
    """The figures taken directly from every committed event in the store."""
    topics = [get_topic(cls) for cls in EVENT_TYPES.values()]
    orders = captured = refunded = cancelled = shipped = 0
    after = 0
    while True:
        notifications = ledger.recorder.select_notifications(
            start=after, limit=page, topics=topics, inclusive_of_start=False
        )
        for notification in notifications:
            event = cast(Aggregate.Event, ledger.mapper.to_domain_event(notification))
            if isinstance(event, Order.Placed):
                orders += 1
            elif isinstance(event, Order.PaymentCaptured):
                captured += event.amount
            elif isinstance(event, Order.RefundIssued):
                refunded += event.amount
            elif isinstance(event, Order.Cancelled):
                cancelled += 1
            elif isinstance(event, Order.Shipped):
                shipped += 1
        if len(notifications) < page:
            return Figures(orders, captured, refunded, cancelled, shipped)
        after = notifications[-1].id


def summary_figures(runtime: ProjectionRuntime) -> Figures:
    """The same figures as order_summaries' serving generation holds them."""
    with runtime.reading("order_summaries") as (conn, tables):
        table = tables["order_summaries"]
        row = conn.execute(
            select(
                func.count(),
                func.coalesce(func.sum(table.c.captured), 0),
                func.coalesce(func.sum(table.c.refunded), 0),
                func.count().filter(table.c.cancelled.is_(True)),
                func.count().filter(table.c.shipped.is_(True)),
            ).select_from(table)
        ).one()
    return Figures(*(int(value) for value in row))


def checksums(runtime: ProjectionRuntime) -> dict[str, str]:
    """A digest of every serving table of every registered projection, by projection."""
    return {p.name: checksum(table_contents(runtime, p.name)) for p in runtime.projections}


# -- the tracking table -----------------------------------------------------------------------


def generations_by_role(runtime: ProjectionRuntime, role: str) -> dict[str, Generation]:
    """The generation of each projection in the given role (projections without one left out)."""
    return {row.name: row for row in runtime.catalog.rows() if row.role == role}


def owner_pid(row: Generation) -> int | None:
    """The process id inside a lease owner (``host:pid:suffix``), or None when unowned."""
    if row.lease_owner is None:
        return None
    return int(row.lease_owner.split(":")[-2])


def all_serving_at(runtime: ProjectionRuntime, names: Sequence[str], head: int) -> bool:
    """Every named projection serves at ``head``, nothing building, nothing stopped."""
    serving = generations_by_role(runtime, SERVING)
    if generations_by_role(runtime, BUILDING):
        return False
    return all(
        name in serving and serving[name].position >= head and not serving[name].failed
        for name in names
    )


# -- child processes --------------------------------------------------------------------------


def cli_env(**settings: object) -> dict[str, str]:
    """The environment for a CLI child: ours, plus ORDERLEDGER_<NAME> for each setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERLEDGER_")}
    env["ORDERLEDGER_WEBHOOK_ALLOWED_NETWORKS"] = LOCAL_RECEIVERS
    env.update({f"ORDERLEDGER_{key.upper()}": str(value) for key, value in settings.items()})
    env["COLUMNS"] = "240"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class CliProcesses:
    """Starts ``python -m api.cli.main`` children, output in files; kills every one at the end."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.started: list[subprocess.Popen[bytes]] = []
        self._logs: dict[int, Path] = {}

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = self.directory / f"cli-{len(self.started)}-{args[0]}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "api.cli.main", *args],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.started.append(process)
        self._logs[process.pid] = log
        return process

    def wait_for(
        self,
        condition: Callable[[], Any],
        what: str,
        *,
        watch: Sequence[subprocess.Popen[bytes]],
        timeout: float = PROCESS_TIMEOUT,
    ) -> Any:
        """Poll until ``condition()`` holds; fail with its output if a watched child died."""
        return wait_for(condition, what, timeout=timeout, processes=watch, output=self.output)

    def run(self, *args: str, timeout: float = PROCESS_TIMEOUT) -> str:
        """Run a command to its end; fail with its output unless it exits 0."""
        process = self.start(*args)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(process)
            raise AssertionError(f"{args} did not finish: {self.output(process)}") from None
        output = self.output(process)
        assert code == 0, f"{args} exited with {code}: {output}"
        return output

    def output(self, process: subprocess.Popen[bytes]) -> str:
        return self._logs[process.pid].read_text(errors="replace")

    @staticmethod
    def kill(process: subprocess.Popen[bytes]) -> None:
        """SIGKILL: no handler, no finally block, no lease given back."""
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(PROCESS_TIMEOUT)

    def terminate(self, process: subprocess.Popen[bytes]) -> int:
        """SIGTERM once the worker is running (its handlers installed); wait for it to stop."""
        self.wait_for(
            lambda: " running: " in self.output(process),
            "the worker is running",
            watch=[process],
        )
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        return process.wait(PROCESS_TIMEOUT)

    def kill_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.wait(PROCESS_TIMEOUT)


@contextmanager
def cli_processes(directory: Path, **settings: object) -> Iterator[CliProcesses]:
    """CLI children sharing one set of ORDERLEDGER_* settings; none outlives the block."""
    processes = CliProcesses(directory, cli_env(**settings))
    try:
        yield processes
    finally:
        processes.kill_all()


@contextmanager
def opened_store(url: str) -> Iterator[tuple[OrderLedger, ProjectionRuntime]]:
    """This process's own ledger and projection runtime on the store, closed afterwards."""
    with opened(Settings(database_url=url)) as system:
        yield system.ledger, system.runtime
