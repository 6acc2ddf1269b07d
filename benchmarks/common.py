"""What every benchmark shares: throwaway stores, timing, the machine's description and tables."""

from __future__ import annotations

import os
import platform
import shutil
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from rich import box
from rich.console import Console
from rich.table import Table

from domain.eventstore import event_store_env

POSTGRES_URL_VAR = "ORDERLEDGER_BENCH_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
STORES = ("sqlite", "postgres")
CACHE_DIR = Path(os.environ.get("ORDERLEDGER_BENCH_CACHE", "/tmp/orderledger-bench-cache"))
"""Where generated SQLite stores are kept between runs (PostgreSQL keeps template databases)."""

BENCH_MASTER_KEY = "b3" * 32
"""The master key of every benchmark store (a fixed one: cached stores keep their data keys)."""
os.environ.setdefault("ORDERLEDGER_MASTER_KEY", BENCH_MASTER_KEY)

# Wide enough for the tables even when the output goes to a file or a pipe.
console = Console(highlight=False, width=max(shutil.get_terminal_size().columns, 140))


# -- stores -----------------------------------------------------------------------------------


def postgres_admin_url() -> str:
    """The server the benchmarks create their databases on."""
    return os.environ.get(POSTGRES_URL_VAR) or DEFAULT_POSTGRES_URL


def postgres_unreachable_reason(admin_url: str) -> str | None:
    """None when PostgreSQL answers at admin_url, else why not (one line)."""
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as error:
        return str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    return None


@contextmanager
def temporary_sqlite_url() -> Iterator[str]:
    """A fresh SQLite file (WAL, as the library opens file stores) in its own directory."""
    directory = tempfile.mkdtemp(prefix="orderledger-bench-")
    try:
        yield f"sqlite:///{directory}/bench.db"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def temporary_postgres_url(admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database on the admin_url's server, dropped afterwards."""
    dbname = f"orderledger_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    parts = urlsplit(admin_url)
    try:
        yield urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, ""))
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            # FORCE: a pooled connection the library has not closed yet must not block the drop.
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@contextmanager
def temporary_store_url(store: str, postgres_admin: str | None = None) -> Iterator[str]:
    """A fresh store of the given kind ("sqlite" or "postgres")."""
    if store == "sqlite":
        with temporary_sqlite_url() as url:
            yield url
    elif store == "postgres":
        with temporary_postgres_url(postgres_admin or postgres_admin_url()) as url:
            yield url
    else:
        raise ValueError(f"unknown store {store!r}: choose one of {', '.join(STORES)}")


@contextmanager
def cached_store_copy(
    store: str, key: str, generate: Callable[[str], None], postgres_admin: str
) -> Iterator[str]:
    """A fresh copy of the store cached under ``key``, made by ``generate(url)`` the first time.

    SQLite stores are kept as files under CACHE_DIR, PostgreSQL ones as template databases
    named after the key; later runs copy them, which takes seconds instead of regenerating.
    """
    if store == "sqlite":
        with _sqlite_copy(key, generate) as url:
            yield url
    else:
        with _postgres_copy(key, generate, postgres_admin) as url:
            yield url


@contextmanager
def _sqlite_copy(key: str, generate: Callable[[str], None]) -> Iterator[str]:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    cached = CACHE_DIR / f"{key}.db"
    if not cached.exists():
        building = CACHE_DIR / f"{key}.building.db"
        for leftover in CACHE_DIR.glob(f"{key}.building.db*"):
            leftover.unlink()
        generate(f"sqlite:///{building}")
        _checkpoint_sqlite(building)
        building.rename(cached)
    with sqlite_file_copy(cached) as url:
        yield url


@contextmanager
def sqlite_file_copy(path: Path | str) -> Iterator[str]:
    """A copy of a SQLite store no one is writing (its WAL folded in first), removed after."""
    _checkpoint_sqlite(Path(path))
    directory = tempfile.mkdtemp(prefix="orderledger-bench-")
    try:
        shutil.copyfile(path, f"{directory}/store.db")
        yield f"sqlite:///{directory}/store.db"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _checkpoint_sqlite(path: Path) -> None:
    """Fold the WAL into the database file, so copying the file copies everything."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


@contextmanager
def _postgres_copy(key: str, generate: Callable[[str], None], admin: str) -> Iterator[str]:
    template = f"orderledger_bench_cache_{key}"
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (template,))
        cached = exists.fetchone() is not None
    if not cached:
        with temporary_postgres_url(admin) as scratch:
            generate(scratch)
            scratch_name = urlsplit(scratch).path.lstrip("/")
            with psycopg.connect(admin, autocommit=True) as conn:
                _end_sessions(conn, scratch_name)
                conn.execute(f'CREATE DATABASE "{template}" TEMPLATE "{scratch_name}"')
    with postgres_template_copy(admin, template) as url:
        yield url


@contextmanager
def postgres_template_copy(admin: str, template: str) -> Iterator[str]:
    """A new database copied from ``template`` (its sessions ended first), dropped after."""
    dbname = f"orderledger_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        _end_sessions(conn, template)
        conn.execute(f'CREATE DATABASE "{dbname}" TEMPLATE "{template}"')
    parts = urlsplit(admin)
    try:
        yield urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, ""))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def _end_sessions(conn: psycopg.Connection[Any], dbname: str) -> None:
    """A template must have no other sessions; pooled ones may linger after dispose."""
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,)
    )


def library_env(database_url: str) -> dict[str, str]:
    """The same database settings as ours, but with the library's own recorders."""
    env = event_store_env(database_url)
    del env["APPLICATION_RECORDER_TOPIC"]
    return env


# -- timing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Wall-clock and this process's CPU seconds of one piece of work."""

    wall: float
    cpu: float

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.cpu + other.cpu)


ZERO = Timing(0.0, 0.0)


def timed(work: Callable[[], object]) -> Timing:
    """How long work() took; CPU time leaves out waiting for the disk and the database server."""
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    work()
    return Timing(time.perf_counter() - started_wall, time.process_time() - started_cpu)


@dataclass
class Measurement:
    """Every timed run of one variant on one store; the best run is the one reported."""

    store: str
    variant: str
    orders: int
    events_per_order: int
    runs: list[Timing] = field(default_factory=list)
    blocks: list[Timing] = field(default_factory=list)
    """Every block of every run, in the order they ran, to pair with other variants' blocks."""

    def add_run(self, blocks: Sequence[Timing]) -> None:
        self.blocks.extend(blocks)
        self.runs.append(sum(blocks, ZERO))

    @property
    def best(self) -> Timing:
        # The fastest run is the one least disturbed by other work on the machine.
        return min(self.runs, key=lambda run: run.wall)

    @property
    def seconds(self) -> float:
        return self.best.wall

    @property
    def cpu_seconds(self) -> float:
        return min(run.cpu for run in self.runs)

    @property
    def median_seconds(self) -> float:
        return statistics.median(run.wall for run in self.runs)

    @property
    def orders_per_second(self) -> float:
        return self.orders / self.seconds

    @property
    def events_per_second(self) -> float:
        return self.orders * self.events_per_order / self.seconds

    @property
    def spread(self) -> float:
        """Slowest run over fastest, minus one: how noisy the runs were."""
        walls = [run.wall for run in self.runs]
        return max(walls) / min(walls) - 1


def overhead(baseline: Measurement, measured: Measurement) -> float:
    """Throughput lost against the baseline, as a fraction of the baseline's throughput."""
    return (baseline.orders_per_second - measured.orders_per_second) / (baseline.orders_per_second)


def paired_overhead(baseline: Measurement, measured: Measurement) -> float:
    """The median throughput lost over blocks that ran side by side in time.

    A stall of the shared disk or CPU lasts long enough to land on one variant's block and not
    the next; pairing neighbouring blocks and taking the median leaves such stalls out.
    """
    if len(baseline.blocks) != len(measured.blocks) or not baseline.blocks:
        raise ValueError("paired overhead needs the same number of blocks from both variants")
    pairs = zip(baseline.blocks, measured.blocks, strict=True)
    return statistics.median(1 - base.wall / ours.wall for base, ours in pairs)


def cpu_overhead(baseline: Measurement, measured: Measurement) -> float:
    """Throughput lost counting only this process's CPU time (best runs)."""
    return 1 - baseline.cpu_seconds / measured.cpu_seconds


def rotated(items: Sequence[str], by: int) -> list[str]:
    """items started at a different place each repeat, so no variant always runs first."""
    shift = by % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


# -- reporting --------------------------------------------------------------------------------


def machine_description(postgres_admin: str | None = None) -> list[tuple[str, str]]:
    """What the numbers were measured on, as (name, value) pairs."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    rows = [
        ("machine", f"{platform.machine()}, {os.cpu_count()} cores, load average {load}"),
        ("system", platform.platform(terse=True)),
        ("python", platform.python_version()),
        ("eventsourcing", version("eventsourcing")),
        ("psycopg", version("psycopg")),
        ("sqlite", sqlite3.sqlite_version),
    ]
    if postgres_admin is not None:
        with psycopg.connect(postgres_admin, autocommit=True, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        rows.append(("postgresql", str(row[0]) if row else "unknown"))
    return rows


def print_description(rows: Sequence[tuple[str, str]]) -> None:
    for name, value in rows:
        console.print(f"[bold]{name}[/bold]: {value}")


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    markdown: bool = False,
) -> None:
    """A table with the first two columns left-aligned and the numbers right-aligned."""
    table = Table(
        title=title, title_justify="left", box=box.MARKDOWN if markdown else box.HEAVY_HEAD
    )
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index < 2 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def note(message: str) -> None:
    console.print(f"[yellow]note:[/yellow] {message}")
