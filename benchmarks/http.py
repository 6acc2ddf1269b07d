"""HTTP API: place-order and get-order over a real `orderledger serve`, against direct calls.

A store of N orders (one ``OrderPlaced`` each, every read model caught up) is generated once
and cached (a SQLite file, a PostgreSQL template database); each run works on a fresh copy.
An API key is issued with ``orderledger keys create`` and ``orderledger serve`` runs on a
random loopback port (projections in process, the embedded mode; one API process, then
``--workers 2``). Clients run in a separate process (``benchmarks.loadgen``): for each number
of concurrent clients, place-order (POST /orders) and get-order (GET /orders/{id} of random
existing orders) for a fixed time after a warm-up. The baseline runs the same commands in
another process through ``OrderLedger.place_order`` and the ``PointReader`` the API reads an
order with, directly, one thread per client, with the same projection worker running beside
them. A floor variant serves a constant order from the same uvicorn with no work at all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from uuid import UUID

from sqlalchemy import Connection, Table, func, select

from api.bootstrap import open_ledger, open_read_models, opened
from api.http.routes.order_queries import order_listing, public, public_json
from api.http.routes.orders import order_history
from api.http.schemas.reads import OrderSummariesPublic
from api.settings import Settings
from benchmarks.common import (
    BENCH_MASTER_KEY,
    STORES,
    cached_store_copy,
    console,
    machine_description,
    note,
    postgres_admin_url,
    postgres_unreachable_reason,
    print_description,
    print_table,
)
from benchmarks.loadgen import (
    LIST_LIMIT,
    OPERATIONS,
    CellResult,
    LoadSpec,
    Window,
    customer_of,
    place_order_body,
    read_ids,
)
from domain.ledger import OrderLedger
from domain.order import Order
from projections.engine.point_read import PointReader
from projections.engine.runtime import ProjectionRuntime
from projections.registry import all_projections

CACHE_VERSION = 1
"""Bump when the generated orders change, so cached stores are made again."""
SAVE_CHUNK = 1000
"""Orders per ``ledger.save`` while generating: one transaction each."""
ROOT = Path(__file__).resolve().parent.parent
ORDERLEDGER = Path(sys.executable).parent / "orderledger"
GET_P99_GOAL_MS = 20.0
GET_GOAL_CLIENTS = 64
PLACE_RATIO_GOAL = 0.60
START_DELAY = 1.0
"""Seconds between handing a cell to a process and its clients starting (process start-up)."""


# -- the store: N placed orders, read models caught up, cached -------------------------------


def _cache_key(orders: int) -> str:
    """The cache's name: the order count and every projection's version.

    A projection whose version changed would be rebuilt by the server at start-up, under load.
    """
    versions = ",".join(f"{p.name}:{p.version}" for p in all_projections())
    digest = hashlib.sha256(versions.encode()).hexdigest()[:8]
    return f"http_v{CACHE_VERSION}_{orders}_{digest}"


def generate(url: str, orders: int) -> None:
    """Record ``orders`` placed orders, many per transaction, then catch every read model up."""
    started = time.perf_counter()
    settings = Settings(database_url=url)
    ledger = open_ledger(settings)
    try:
        for first in range(0, orders, SAVE_CHUNK):
            chunk = range(first, min(orders, first + SAVE_CHUNK))
            ledger.save(*(Order.place(**place_order_body(n)) for n in chunk))
        saved = time.perf_counter()
        # Opened after the orders are saved: the outbox, installed now, sends nothing for them.
        runtime = open_read_models(settings, ledger)
        try:
            runtime.worker().run_until_caught_up(timeout=3 * 3600)
        finally:
            runtime.close()
    finally:
        ledger.close()
    note(
        f"generated {orders:,} orders in {saved - started:.0f}s, read models caught up in "
        f"{time.perf_counter() - saved:.0f}s: {url}"
    )


@contextmanager
def order_store(store: str, orders: int, postgres_admin: str) -> Iterator[str]:
    """A fresh copy of a store of ``orders`` placed orders with its read models caught up."""
    with cached_store_copy(
        store, _cache_key(orders), partial(generate, orders=orders), postgres_admin
    ) as url:
        yield url


def sample_order_ids(url: str, count: int, path: Path) -> int:
    """Write ``count`` random order ids of the store to ``path``, one a line; how many."""

    def random_ids(conn: Connection, tables: dict[str, Table]) -> list[str]:
        table = tables["order_summaries"]
        query = select(table.c.order_id).order_by(func.random()).limit(count)
        return [str(row[0]) for row in conn.execute(query)]

    with opened(Settings(database_url=url)) as system:
        ids = system.runtime.read("order_summaries", random_ids)
    path.write_text("".join(f"{order_id}\n" for order_id in ids), encoding="ascii")
    return len(ids)


def clean_env() -> dict[str, str]:
    """This environment without ORDERLEDGER_* settings but the benchmarks' master key: the
    benchmark passes its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERLEDGER_")}
    return {**env, "ORDERLEDGER_MASTER_KEY": BENCH_MASTER_KEY}


def issue_key(url: str) -> str:
    """A writer key for the store, through the command line an operator would use."""
    done = subprocess.run(
        [
            *(str(ORDERLEDGER), "keys", "create", "--role", "writer", "--name", "loadbench"),
            *("--database-url", url, "--quiet"),
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


# -- the server --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A running ``orderledger serve``: its process, port and log."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def serve_has_workers_option() -> bool:
    """Whether this build's ``orderledger serve`` takes ``--workers``."""
    done = subprocess.run(
        [str(ORDERLEDGER), "serve", "--help"],
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return "--workers" in done.stdout


def _wait_ready(server: Server, timeout: float) -> None:
    """Wait for /readyz to say 200: the store is reachable and the read models are current."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{server.port}/readyz"
    last = "no answer"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"the server exited ({server.process.returncode}): {_log_tail(server.log)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError as error:
            last = f"{error.code}: {error.read()[:300]!r}"
        except OSError as error:
            last = str(error)
        time.sleep(0.2)
    raise RuntimeError(
        f"the server was not ready within {timeout:.0f}s ({last}): {_log_tail(server.log)}"
    )


def _log_tail(log: Path, lines: int = 20) -> str:
    """The end of the server's log, for an error message (the log's directory is removed)."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def serving(url: str, workers: int, log_dir: Path) -> Iterator[Server]:
    """``orderledger serve`` on a random loopback port, stopped (SIGINT, then SIGKILL) after."""
    port = free_port()
    command = [str(ORDERLEDGER), "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--database-url", url]
    if workers > 1:
        command += ["--workers", str(workers)]
    with running(command, port, log_dir) as server:
        yield server


@contextmanager
def floor_serving(processes: int, log_dir: Path) -> Iterator[Server]:
    """The constant-answer uvicorn app (benchmarks.floor_app) on a random loopback port."""
    port = free_port()
    command = [sys.executable, "-m", "benchmarks.floor_app", str(port), str(processes)]
    with running(command, port, log_dir, env={**clean_env(), "PYTHONPATH": str(ROOT)}) as server:
        yield server


@contextmanager
def running(
    command: list[str], port: int, log_dir: Path, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """A server process answering on ``port``, stopped (SIGINT, then SIGKILL) after."""
    log = log_dir / f"serve-{port}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            env=env or clean_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=ROOT if env else log_dir,
        )
    server = Server(process, port, log)
    try:
        _wait_ready(server, timeout=600)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants, from /proc."""
    total = 0.0
    pending = [pid]
    ticks = os.sysconf("SC_CLK_TCK")
    while pending:
        current = pending.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


# -- cells -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One measured cell: what the clients saw, and the CPU the application used meanwhile."""

    result: CellResult
    app_cpu_seconds: float
    generator_cpu_seconds: float | None
    load: float


def cpu_over_window(
    spec: LoadSpec, cpu: Callable[[], float], at_start: Callable[[], object] | None = None
) -> float:
    """The CPU ``cpu()`` counts between the cell's window start and end (sleeping meanwhile)."""
    window = Window.of(spec)
    time.sleep(max(0.0, window.start - time.perf_counter()))
    if at_start is not None:
        at_start()
    before = cpu()
    time.sleep(max(0.0, window.end - time.perf_counter()))
    return cpu() - before


def http_cell(server: Server, spec: LoadSpec, profile: Path | None = None) -> Cell:
    """Run the load generator against the server for one cell (under py-spy, if profiling)."""
    spec = replace(spec, port=server.port, begin_at=time.time() + START_DELAY)
    generator = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.loadgen", json.dumps(spec.__dict__)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    spies: list[subprocess.Popen[bytes]] = []

    def start_profiling() -> None:
        if profile is not None:
            spies.append(py_spy(server.process.pid, spec.seconds, profile))

    app_cpu = cpu_over_window(spec, partial(tree_cpu_seconds, server.process.pid), start_profiling)
    out, _ = generator.communicate(timeout=spec.warmup + spec.seconds + 120)
    for spy in spies:
        spy.wait(timeout=60)
    if generator.returncode != 0:
        raise RuntimeError(f"the load generator failed ({generator.returncode})")
    result = CellResult.from_json(out.strip().splitlines()[-1])
    return Cell(result, app_cpu, result.cpu_seconds, os.getloadavg()[0])


class DirectProcess:
    """A process running cells through the application service directly, one thread a client."""

    def __init__(self, url: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.http", "--direct-child", url],
            cwd=ROOT,
            env={**clean_env(), "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the direct process did not start")

    def cell(self, spec: LoadSpec) -> Cell:
        assert self.process.stdin is not None and self.process.stdout is not None
        spec = replace(spec, begin_at=time.time() + START_DELAY / 4)
        self.process.stdin.write(json.dumps(spec.__dict__) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the direct process exited")
        result = CellResult.from_json(line)
        return Cell(result, result.cpu_seconds, None, os.getloadavg()[0])

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


def direct_child(url: str) -> None:
    """Run in a child process: cells from standard input, results (JSON lines) to stdout.

    The projection worker runs in this process as ``serve`` runs it, so the comparison with
    HTTP leaves out only the HTTP layer.
    """
    settings = Settings(database_url=url)
    ledger = open_ledger(settings)
    runtime = open_read_models(settings, ledger)
    worker = runtime.worker(idle_wait=settings.projection_idle_wait)
    worker.start()
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            spec = LoadSpec(**json.loads(line))
            print(direct_cell(ledger, runtime, spec).to_json(), flush=True)
    finally:
        worker.stop()
        runtime.close()
        ledger.close()


def direct_cell(ledger: OrderLedger, runtime: ProjectionRuntime, spec: LoadSpec) -> CellResult:
    window = Window.of(spec)
    operation = _direct_operation(ledger, runtime, spec)

    def client(first: int) -> None:
        number = first
        while time.perf_counter() < window.end:
            started = time.perf_counter()
            try:
                status = operation(number)
            except Exception as error:  # counted as an error, as a 5xx would be
                status = type(error).__name__
            window.record(started, time.perf_counter(), status)
            number += spec.clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(spec.clients)]
    time.sleep(max(0.0, window.begin - time.perf_counter()))
    for thread in threads:
        thread.start()
    cpu = cpu_over_window(spec, time.process_time)
    for thread in threads:
        thread.join()
    return CellResult.from_window(window, cpu)


def _direct_operation(
    ledger: OrderLedger, runtime: ProjectionRuntime, spec: LoadSpec
) -> Callable[[int], str]:
    """One request's work without HTTP, answering the status HTTP would have answered."""
    if spec.operation == "place":

        def place(number: int) -> str:
            ledger.place_order(**place_order_body(number))
            return "201"

        return place
    rng = random.Random(spec.clients)
    if spec.operation == "list":
        # What GET /orders?customer_id=... does: the read model's page, in public form.
        def listing(_number: int) -> str:
            query = order_listing(
                customer_of(rng.randrange(5003)), None, None, None, LIST_LIMIT, None
            )
            with runtime.reading("order_summaries") as (conn, tables):
                page = query(conn, tables)
            OrderSummariesPublic(
                data=[public(s) for s in page.items], next_cursor=page.next_cursor, next=None
            ).model_dump_json()
            return "200"

        return listing
    ids = read_ids(spec.ids_file or "")
    if spec.operation == "history":
        # What GET /orders/{id}/history does: the route's own function, then its JSON.
        def history(_number: int) -> str:
            order_history(ledger, UUID(rng.choice(ids))).model_dump_json()
            return "200"

        return history
    # What the API's get-order does: one point read, then the order's JSON written from the row.
    reader = PointReader(runtime.engine, runtime.catalog, "order_summaries", "order_summaries")

    def get(_number: int) -> str:
        found = reader.get(rng.choice(ids))
        if found is None or found.row is None:
            return "404"
        public_json(found.row)
        return "200"

    return get


# -- profiling ---------------------------------------------------------------------------------


def py_spy(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes]:
    """Sample the server (and its worker processes) with py-spy into collapsed stacks."""
    command = ["py-spy", "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--gil"]
    command += ["--duration", str(max(1, round(seconds))), "--rate", "250"]
    command += ["--format", "raw", "--output", str(output)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile_summary(path: Path, top: int = 20) -> list[list[str]]:
    """Where the server's samples were: the top functions by own samples, then ours.

    Rows are (own share, inclusive share, function). A function counts once per sample
    however deep it recurs, so inclusive shares nest: a caller's includes its callees'.
    "Ours" are the functions in this repository (api/, domain/, projections/).
    """
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [_frame_name(frame) for frame in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples
    if not total:
        return []
    by_own = sorted(own, key=lambda frame: -own[frame])[:top]
    ours = [frame for frame in inclusive if frame.startswith("ours:")]
    by_inclusive = sorted(ours, key=lambda frame: -inclusive[frame])[:top]
    return [
        [f"{own.get(frame, 0) / total:.1%}", f"{inclusive[frame] / total:.1%}", frame]
        for frame in [*by_own, *by_inclusive]
    ]


OUR_PACKAGES = ("api", "domain", "projections")


def _frame_name(frame: str) -> str:
    """``function (package/module.py)`` from py-spy's ``function (package/module.py:12)``.

    py-spy names files relative to their ``sys.path`` entry; this repository's packages are
    marked ``ours:``.
    """
    if " (" not in frame:
        return frame
    function, location = frame.split(" (", 1)
    path = location.rstrip(")").rsplit(":", 1)[0]
    mine = path.split("/", 1)[0] in OUR_PACKAGES
    return f"{'ours: ' if mine else ''}{function} ({path})"


# -- the command -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One cell of the table: a store, a variant, an operation and a number of clients."""

    store: str
    variant: str
    spec: LoadSpec
    cell: Cell


DIRECT = "direct"


def http_variant(processes: int) -> str:
    return f"HTTP {processes} proc{'s' if processes > 1 else ''}"


def report_cell(row: Row) -> None:
    result = row.cell.result
    errors = f"errors {result.errors} {result.statuses}" if result.errors else "no errors"
    console.print(
        f"{row.store} {row.variant} {row.spec.operation} x{row.spec.clients}: "
        f"{result.rate:,.0f}/s, p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
        f"app CPU {1000 * row.cell.app_cpu_seconds / max(result.requests, 1):.2f} ms/req, "
        f"{errors}, load {row.cell.load:.2f}"
    )


def measure_store(
    store: str, args: argparse.Namespace, admin: str, processes: list[int], work: Path
) -> list[Row]:
    """Every cell on one store: direct first, then each number of API processes."""
    rows: list[Row] = []
    with order_store(store, args.orders, admin) as url:
        ids_file = work / f"{store}-order-ids.txt"
        sampled = sample_order_ids(url, args.sample_ids, ids_file)
        token = issue_key(url)
        note(f"{store}: copy ready, {sampled:,} order ids sampled, writer key issued")
        specs = [
            LoadSpec(op, clients, args.warmup, args.seconds, token=token, ids_file=str(ids_file))
            for op in args.operations
            for clients in args.clients
        ]
        direct = DirectProcess(url)
        try:
            for spec in specs:
                rows.append(Row(store, DIRECT, spec, direct.cell(spec)))
                report_cell(rows[-1])
        finally:
            direct.close()
        for count in processes:
            rows += http_rows(store, count, url, specs, args, work)
    return rows


def http_rows(
    store: str,
    processes: int,
    url: str,
    specs: list[LoadSpec],
    args: argparse.Namespace,
    work: Path,
) -> list[Row]:
    """The cells over one ``orderledger serve``, then get-order paced at a share of its rate."""
    rows: list[Row] = []
    variant = http_variant(processes)
    with serving(url, processes, work) as server:
        for spec in specs:
            rows.append(Row(store, variant, spec, profiled_cell(server, spec, store, args)))
            report_cell(rows[-1])
        closed = [
            r for r in rows if r.spec.operation == "get" and r.spec.clients == max(args.clients)
        ]
        if closed and args.paced_share > 0:
            rate = round(args.paced_share * closed[-1].cell.result.rate)
            spec = replace(closed[-1].spec, rate=float(max(rate, 1)))
            rows.append(Row(store, variant, spec, profiled_cell(server, spec, store, args)))
            report_cell(rows[-1])
    return rows


def floor_rows(args: argparse.Namespace, processes: list[int], work: Path) -> list[Row]:
    """Get-order cells against the constant-answer app: what HTTP alone costs here."""
    ids_file = work / "floor-ids.txt"
    ids_file.write_text("0d9b1f5e-3c1a-4f55-9a7e-2b8f6f3f8a10\n", encoding="ascii")
    rows: list[Row] = []
    for count in processes:
        variant = f"floor {count} proc{'s' if count > 1 else ''}"
        with floor_serving(count, work) as server:
            for clients in args.clients:
                spec = LoadSpec("get", clients, args.warmup, args.seconds, ids_file=str(ids_file))
                rows.append(Row("-", variant, spec, http_cell(server, spec)))
                report_cell(rows[-1])
    return rows


def profiled_cell(server: Server, spec: LoadSpec, store: str, args: argparse.Namespace) -> Cell:
    """An HTTP cell; with --profile-dir, its py-spy samples summarised after it."""
    if args.profile_dir is None:
        return http_cell(server, spec)
    paced = f"-at{spec.rate:.0f}" if spec.rate else ""
    profile = args.profile_dir / f"{store}-{spec.operation}-{spec.clients}{paced}-{server.port}.txt"
    cell = http_cell(server, spec, profile)
    if profile.exists():
        print_table(
            f"py-spy, {store} {spec.operation} x{spec.clients}{paced}: top functions by own "
            f"samples, then ours by inclusive samples ({profile})",
            ["own", "inclusive", "function"],
            profile_summary(profile),
            markdown=args.markdown,
        )
    return cell


def direct_rate(rows: list[Row], row: Row) -> float | None:
    for other in rows:
        if (
            other.variant == DIRECT
            and not row.spec.rate
            and other.store == row.store
            and other.spec.operation == row.spec.operation
            and other.spec.clients == row.spec.clients
        ):
            return other.cell.result.rate
    return None


def operation_label(spec: LoadSpec) -> str:
    label = {
        "get": "get-order",
        "get-route": "get-order route",
        "place": "place-order",
        "history": "order history",
        "list": "customer's orders",
    }[spec.operation]
    return f"{label} @{spec.rate:,.0f}/s" if spec.rate else label


def table_row(rows: list[Row], row: Row) -> list[str]:
    result = row.cell.result
    base = direct_rate(rows, row)
    generator = row.cell.generator_cpu_seconds
    return [
        row.store,
        row.variant,
        operation_label(row.spec),
        str(row.spec.clients),
        f"{result.rate:,.0f}",
        f"{result.p50_ms:.1f}",
        f"{result.p99_ms:.1f}",
        f"{result.max_ms:.0f}",
        f"{result.errors:,}",
        f"{1000 * row.cell.app_cpu_seconds / max(result.requests, 1):.2f}",
        "-" if generator is None else f"{100 * generator / result.seconds:.0f}%",
        "-" if row.variant == DIRECT or not base else f"{result.rate / base:.0%}",
        f"{row.cell.load:.1f}",
    ]


def goal_rows(rows: list[Row]) -> list[list[str]]:
    """Each HTTP variant's figures against the two goals."""
    lines: list[list[str]] = []
    for row in rows:
        if row.variant == DIRECT or row.store == "-":
            continue
        result = row.cell.result
        if row.spec.operation == "get" and row.spec.clients == GET_GOAL_CLIENTS:
            met = result.p99_ms < GET_P99_GOAL_MS and result.errors == 0
            goal = f"get-order p99 < {GET_P99_GOAL_MS:.0f} ms at {GET_GOAL_CLIENTS} clients"
            if row.spec.rate:
                goal += f" (paced at {row.spec.rate:,.0f}/s: not the goal's closed loop)"
            lines.append([row.store, row.variant, goal, f"{result.p99_ms:.1f} ms", _met(met)])
        base = direct_rate(rows, row)
        if row.spec.operation == "place" and base:
            ratio = result.rate / base
            goal = f"place-order >= {PLACE_RATIO_GOAL:.0%} of direct, {row.spec.clients} clients"
            met = ratio >= PLACE_RATIO_GOAL and result.errors == 0
            lines.append([row.store, row.variant, goal, f"{ratio:.0%}", _met(met)])
    return lines


def _met(met: bool) -> str:
    return "met" if met else "NOT met"


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _name_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}: choose from {choices}")
        return names

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--orders", type=int, default=1_000_000, help="orders in the store (1,000,000)"
    )
    parser.add_argument(
        "--clients", type=_int_list, default=[1, 16, 64], help="concurrent clients (1,16,64)"
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="measured seconds per cell (10)"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="unmeasured seconds before each cell (2)"
    )
    parser.add_argument(
        "--stores",
        type=_name_list(STORES),
        default=list(STORES),
        help="comma-separated: sqlite,postgres",
    )
    parser.add_argument(
        "--operations",
        type=_name_list(OPERATIONS),
        default=["get", "place"],
        help="comma-separated: get,place,get-route (get-order through the FastAPI route), "
        "history, list (a customer's orders)",
    )
    parser.add_argument(
        "--api-processes",
        type=_int_list,
        default=[1, 2],
        help="API processes to serve with, one run each (1,2; more than 1 needs serve --workers)",
    )
    parser.add_argument(
        "--sample-ids",
        type=int,
        default=20_000,
        help="random existing order ids the get-order clients choose from (20,000)",
    )
    parser.add_argument(
        "--paced-share",
        type=float,
        default=0.5,
        help="after the closed-loop cells, get-order with the most clients once more, paced "
        "at this share of the rate they reached (0.5; 0 skips)",
    )
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="sample the server with py-spy (must be on PATH) during every HTTP cell, keep "
        "the collapsed stacks here and print the top functions (the samples cost CPU: not "
        "for the figures)",
    )
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also get-order from uvicorn answering a constant order with no work at all "
        "(benchmarks.floor_app), with the same processes: the HTTP floor of this machine",
    )
    parser.add_argument("--markdown", action="store_true", help="tables as Markdown")


def run(args: argparse.Namespace) -> int:
    stores = list(args.stores)
    admin = postgres_admin_url()
    if "postgres" in stores and (reason := postgres_unreachable_reason(admin)):
        note(f"PostgreSQL skipped: {reason}")
        stores.remove("postgres")
    processes = sorted(set(args.api_processes))
    if any(count > 1 for count in processes) and not serve_has_workers_option():
        note("orderledger serve has no --workers in this build: one API process only")
        processes = [count for count in processes if count == 1]
    print_description(machine_description(admin if "postgres" in stores else None))
    console.print(f"[bold]command[/bold]: python -m benchmarks http {' '.join(sys.argv[2:])}")

    if args.profile_dir is not None:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="orderledger-bench-http-"))
    try:
        for store in stores:
            rows += measure_store(store, args, admin, processes, work)
        if args.floor and "get" in args.operations:
            rows += floor_rows(args, processes, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(
        f"HTTP API against direct calls ({args.orders:,} orders stored; {args.seconds:g} s "
        f"per cell after {args.warmup:g} s warm-up; app CPU = the server's processes, or the "
        "direct process, per request; gen CPU = the load generator's share of one core; "
        "load = 1-minute load average after the cell; @N/s: paced at N requests/s)",
        [
            "store",
            "variant",
            "operation",
            "clients",
            "req/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "errors",
            "app CPU ms",
            "gen CPU",
            "vs direct",
            "load",
        ],
        [table_row(rows, row) for row in rows],
        markdown=args.markdown,
    )
    print_table(
        "Against the goals",
        ["store", "variant", "goal", "measured", "result"],
        goal_rows(rows),
        markdown=args.markdown,
    )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--direct-child"]:
        direct_child(sys.argv[2])
        sys.exit(0)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
