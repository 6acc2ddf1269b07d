"""The orderledger command line (typer): serve the API, record demo orders, audit an order."""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, NoReturn
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import typer
from eventsourcing.persistence import PersistenceError
from pydantic import SecretStr, ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from api.cli import keys, operate, webhooks
from api.demo import SCENARIOS, populate
from api.settings import Settings
from domain.errors import InvalidCommandError, OrderLedgerError
from domain.ledger import HistoryEntry, OrderLedger
from domain.money import MINOR_UNITS
from domain.order import Order

if TYPE_CHECKING:
    from fastapi import FastAPI

app = typer.Typer(
    help="orderledger: an event-sourced order ledger.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Exit codes: 1 when the store or the order says no, 2 when the command line itself is wrong.
EXIT_FAILURE = 1
EXIT_USAGE = 2

_SERVE_PID_VAR = "ORDERLEDGER_SERVE_PID"
"""Set by ``serve --workers N`` for its children, which exit when that process is gone."""
_PARENT_POLL_SECONDS = 1.0

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="Event store URL (sqlite:///path.db or postgresql://user@host/db); "
        "overrides ORDERLEDGER_DATABASE_URL.",
        show_default=False,
    ),
]


def _stdout() -> Console:
    return Console(highlight=False)


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    Console(stderr=True, highlight=False).print(f"Error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def _redacted(url: str) -> str:
    """The URL without its password, fit for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@app.callback()
def _root() -> None:
    """orderledger: an event-sourced order ledger."""


def _settings(database_url: str | None, **overrides: Any) -> Settings:
    """Settings from the environment, with command-line options winning."""
    values = {name: value for name, value in overrides.items() if value is not None}
    if database_url is not None:
        values["database_url"] = database_url
    try:
        return Settings(**values)
    except ValidationError as error:
        _fail(_settings_problem(error), EXIT_USAGE)


def _settings_problem(error: ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
        for problem in error.errors()
    )
    return f"invalid settings: {problems}"


def _open_ledger(settings: Settings) -> OrderLedger:
    try:
        return OrderLedger.from_url(settings.database_url)
    except ValueError as error:
        _fail(f"bad database URL {_redacted(settings.database_url)!r}: {error}", EXIT_USAGE)
    except (PersistenceError, OSError) as error:
        _fail(f"cannot open the event store at {_redacted(settings.database_url)}: {error}")


@contextmanager
def _reported_errors() -> Iterator[None]:
    """Turn the errors a command can expect into one line on stderr and an exit code."""
    try:
        yield
    except InvalidCommandError as error:
        _fail(str(error), EXIT_USAGE)
    except OrderLedgerError as error:
        _fail(str(error))
    except PersistenceError as error:
        _fail(f"the event store failed: {error}")
    except OSError as error:
        _fail(str(error))


def format_money(amount: int, currency: str) -> str:
    """Minor units as a readable amount: 123450 EUR -> 'EUR 1,234.50', 1800 JPY -> 'JPY 1,800'."""
    exponent = MINOR_UNITS.get(currency, 2)
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(amount), 10**exponent)
    text = f"{currency} {sign}{whole:,}"
    return f"{text}.{fraction:0{exponent}d}" if exponent else text


# -- serve ------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Interface to bind (default ORDERLEDGER_HOST or 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to bind (default ORDERLEDGER_PORT or 8000).")
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            max=64,
            help="API processes. With more than one, projections and effects run once, in one "
            "worker process beside them.",
        ),
    ] = 1,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Serve the HTTP API."""
    settings = _settings(database_url, host=host, port=port)
    with _reported_errors():
        if workers == 1:
            run_server(settings)
        else:
            run_workers(settings, workers)


def run_server(settings: Settings) -> None:
    """Run the API under uvicorn until interrupted, projections and effects in the same process."""
    # The HTTP stack loads only when serving, so the other commands start quickly.
    import uvicorn  # noqa: PLC0415

    from api.http.app import create_app  # noqa: PLC0415
    from api.http.transport import CoalescingHttpToolsProtocol  # noqa: PLC0415
    from api.logs import logging_config  # noqa: PLC0415

    # Opened here rather than in the app's start-up so a bad store is one clear line, not a
    # failed lifespan with a traceback.
    ledger = _open_ledger(settings)
    try:
        _exit_normally_after_shutdown()
        uvicorn.run(
            create_app(settings, ledger=ledger),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            log_config=logging_config(settings.log_format, settings.log_level),
            access_log=False,
            http=CoalescingHttpToolsProtocol,
        )
    finally:
        ledger.close()


def run_workers(settings: Settings, workers: int) -> None:
    """Run ``workers`` API processes, and projections and effects once, in a worker process.

    The API processes read their settings from the environment set here and share their
    counters through a fresh PROMETHEUS_MULTIPROC_DIR; every child exits with this process.
    """
    import uvicorn  # noqa: PLC0415
    from uvicorn.supervisors import Multiprocess  # noqa: PLC0415

    from api.http.transport import CoalescingHttpToolsProtocol  # noqa: PLC0415
    from api.logs import logging_config  # noqa: PLC0415
    from api.metrics import MULTIPROCESS_DIR_VAR  # noqa: PLC0415

    _open_ledger(settings).close()  # a bad store is one clear line before any process starts
    metrics_dir = tempfile.mkdtemp(prefix="orderledger-metrics-")
    os.environ.update(_environment(settings.model_copy(update={"run_projections": False})))
    os.environ[MULTIPROCESS_DIR_VAR] = metrics_dir
    os.environ[_SERVE_PID_VAR] = str(os.getpid())
    projection_worker = _start_projection_worker() if settings.run_projections else None
    config = uvicorn.Config(
        "api.cli.main:serve_app",
        factory=True,
        workers=workers,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=logging_config(settings.log_format, settings.log_level),
        access_log=False,
        http=CoalescingHttpToolsProtocol,
    )
    try:
        # What uvicorn.run does for workers > 1, with the shared socket labelled TCP.
        Multiprocess(config, sockets=[labelled_tcp(config.bind_socket())]).run()
    except KeyboardInterrupt:
        pass
    finally:
        if projection_worker is not None:
            _stop_process(projection_worker)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def labelled_tcp(listener: socket.socket) -> socket.socket:
    """The listening socket with its protocol set to TCP, so accepted connections get TCP_NODELAY.

    uvicorn creates the socket it shares between worker processes with protocol 0, and asyncio
    sets TCP_NODELAY only on sockets whose protocol says TCP: without it every response on a
    kept-alive connection waits for the client's delayed ACK, about 40 ms (uvicorn issue 3149).
    """
    if listener.family not in (socket.AF_INET, socket.AF_INET6):
        return listener
    return socket.socket(
        listener.family, listener.type, socket.IPPROTO_TCP, fileno=listener.detach()
    )


def serve_app() -> FastAPI:
    """The app of one ``serve --workers N`` process, configured by the environment serve set."""
    from api.http.app import create_app  # noqa: PLC0415

    _exit_with_parent(int(os.environ[_SERVE_PID_VAR]))
    return create_app(Settings())


def _environment(settings: Settings) -> dict[str, str]:
    """The settings as ORDERLEDGER_* variables, so every process serve starts configures alike."""
    variables = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
        elif isinstance(value, bool):
            text = str(value).lower()
        else:
            text = str(value)
        variables[f"ORDERLEDGER_{name.upper()}"] = text
    return variables


def _start_projection_worker() -> multiprocessing.process.BaseProcess:
    """``orderledger worker`` in a child process: the deployment's one projection worker."""
    process = multiprocessing.get_context("spawn").Process(
        target=_projection_worker, args=(os.getpid(),), name="orderledger-worker"
    )
    process.start()
    return process


def _projection_worker(parent: int) -> None:
    _exit_with_parent(parent)
    operate.worker()


def _stop_process(process: multiprocessing.process.BaseProcess, timeout: float = 15.0) -> None:
    """SIGTERM the process and wait for it to finish its batch; SIGKILL it if it hangs."""
    process.terminate()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()


def _exit_normally_after_shutdown() -> None:
    """Let SIGINT and SIGTERM end serve with exit code 0 once uvicorn has shut down.

    uvicorn handles the signal (a graceful shutdown), restores the handlers it found and raises
    the signal again; with the default handlers the process would then die by the signal,
    skipping the ledger's close. These handlers do nothing, so uvicorn.run simply returns.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)


def _exit_with_parent(parent: int) -> None:
    """SIGTERM this process once ``parent`` is gone, so a SIGKILLed serve leaves no orphans."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orderledger-parent-watch", daemon=True).start()


# -- demo -------------------------------------------------------------------------------------


@app.command()
def demo(
    orders: Annotated[int, typer.Option("--orders", "-n", help="How many orders to record.")] = 200,
    if_empty: Annotated[
        bool, typer.Option("--if-empty", help="Do nothing when the store already has events.")
    ] = False,
    seed: Annotated[
        int | None, typer.Option(help="Random seed; the same seed records the same orders.")
    ] = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Record realistic demo orders across the whole order lifecycle."""
    if orders < 1:
        _fail(f"--orders must be 1 or more, got {orders}", EXIT_USAGE)
    settings = _settings(database_url)
    out = _stdout()
    ledger = _open_ledger(settings)
    try:
        with _reported_errors():
            head = ledger.head_position()
            if if_empty and head > 0:
                out.print(
                    f"The store at {_redacted(settings.database_url)} already has {head} "
                    "events; --if-empty: no demo orders recorded."
                )
                return
            with Progress(
                SpinnerColumn(),
                TextColumn("Recording demo orders"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=out,
                transient=False,
            ) as progress:
                task = progress.add_task("demo", total=orders)
                result = populate(
                    ledger,
                    orders=orders,
                    seed=seed,
                    on_order=lambda _scenario: progress.advance(task),
                )
    finally:
        ledger.close()
    table = Table(title="Demo orders by how they ended", title_justify="left")
    table.add_column("Scenario")
    table.add_column("Orders", justify="right")
    for scenario in SCENARIOS:
        table.add_row(scenario.name.replace("_", " "), str(result.outcomes[scenario.name]))
    out.print(table)
    out.print(
        f"Recorded {len(result.order_ids)} orders ({result.events} events) "
        f"in {_redacted(settings.database_url)}."
    )
    out.print(f"Try: orderledger audit {result.order_ids[-1]}", soft_wrap=True)


# -- audit ------------------------------------------------------------------------------------


def _parse_order_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        _fail(f"{text!r} is not an order id (a UUID such as {UUID(int=0)})", EXIT_USAGE)


def _parse_moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        _fail(f"--at {text!r} is not an ISO 8601 time such as 2026-01-31T12:00:00Z", EXIT_USAGE)
    if moment.tzinfo is None:
        _fail(f"--at {text!r} has no timezone; add one, e.g. {text}Z or {text}+01:00", EXIT_USAGE)
    return moment


def _lines_summary(lines: list[dict[str, Any]], currency: str) -> str:
    return ", ".join(
        f"{line['quantity']} x {line['sku']} @ {format_money(line['unit_price'], currency)}"
        for line in lines
    )


def _placed_summary(data: dict[str, Any], currency: str) -> str:
    parts = [data["customer_id"], _lines_summary(data["lines"], currency)]
    if data.get("client_reference"):
        parts.append(f"ref {data['client_reference']}")
    return " | ".join(parts)


_SUMMARIES: dict[str, Callable[[dict[str, Any], str], str]] = {
    "OrderPlaced": _placed_summary,
    "OrderLineAdded": lambda data, currency: _lines_summary([data], currency),
    "OrderLineRemoved": lambda data, _: str(data["sku"]),
    "PaymentCaptured": lambda data, currency: (
        f"{format_money(data['amount'], currency)} | ref {data['payment_reference']}"
    ),
    "OrderShipped": lambda data, _: f"{data['carrier']} {data['tracking_number']}",
    "OrderCancelled": lambda data, _: str(data["reason"]),
    "RefundIssued": lambda data, currency: (
        f"{format_money(data['amount'], currency)} | {data['reason']}"
    ),
}


def _event_summary(entry: HistoryEntry, currency: str) -> str:
    summary = _SUMMARIES.get(entry.type)
    if summary is not None:
        return summary(entry.data, currency)
    return ", ".join(f"{key}={value}" for key, value in entry.data.items()) or "-"


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _history_table(history: list[HistoryEntry], order: Order) -> Table:
    shown = [entry for entry in history if entry.version <= order.version]
    later = len(history) - len(shown)
    caption = f"{later} later event(s) not shown" if later else None
    table = Table(
        title=f"History of order {order.id}",
        title_justify="left",
        caption=caption,
        caption_justify="left",
    )
    table.add_column("Position", justify="right")
    table.add_column("Version", justify="right")
    table.add_column("Event")
    table.add_column("Recorded at (UTC)")
    table.add_column("Details")
    for entry in shown:
        table.add_row(
            str(entry.position),
            str(entry.version),
            entry.type,
            _time(entry.timestamp),
            _event_summary(entry, order.currency),
        )
    return table


def _state_table(order: Order, *, latest_version: int) -> Table:
    label = "latest" if order.version == latest_version else f"of {latest_version}"
    table = Table(
        title=f"State at version {order.version} ({label})",
        title_justify="left",
        show_header=False,
    )
    table.add_column("Field", style="bold")
    table.add_column("Value")
    money = order.currency
    rows: list[tuple[str, str | None]] = [
        ("Status", order.status),
        ("Customer", order.customer_id),
        ("Currency", order.currency),
        ("Total", format_money(order.total, money)),
        ("Captured", format_money(order.captured, money)),
        ("Refunded", format_money(order.refunded, money)),
        ("Balance due", format_money(order.balance_due, money)),
        ("Refund due", format_money(order.refund_due, money)),
        ("Payments", ", ".join(order.payment_references) or None),
        ("Ship to", order.shipping_address),
        ("Client reference", order.client_reference),
        ("Carrier", f"{order.carrier} {order.tracking_number}" if order.carrier else None),
        ("Cancellation reason", order.cancellation_reason),
        ("Updated at (UTC)", _time(order.modified_on)),
    ]
    for name, value in rows:
        if value is not None:
            table.add_row(name, value)
    return table


def _lines_table(order: Order) -> Table:
    table = Table(title="Lines", title_justify="left")
    table.add_column("SKU")
    table.add_column("Quantity", justify="right")
    table.add_column("Unit price", justify="right")
    table.add_column("Amount", justify="right")
    for line in order.lines.values():
        table.add_row(
            line.sku,
            str(line.quantity),
            format_money(line.unit_price, order.currency),
            format_money(line.amount, order.currency),
        )
    return table


@app.command()
def audit(
    order_id: Annotated[
        str, typer.Argument(help="The order's id (a UUID).", metavar="ORDER_ID", show_default=False)
    ],
    at_version: Annotated[
        int | None,
        typer.Option("--at-version", help="Show the order as it was at this version."),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            help="Show the order as it was at this ISO 8601 time (with timezone).",
            show_default=False,
        ),
    ] = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Print an order's recorded history and the state it results in."""
    uuid = _parse_order_id(order_id)
    if at_version is not None and at is not None:
        _fail("give either --at-version or --at, not both", EXIT_USAGE)
    moment = _parse_moment(at) if at is not None else None
    settings = _settings(database_url)
    ledger = _open_ledger(settings)
    try:
        with _reported_errors():
            history = ledger.order_history(uuid)
            order = ledger.order_as_of(uuid, version=at_version, at=moment)
    finally:
        ledger.close()
    out = _stdout()
    out.print(_history_table(history, order))
    out.print(_state_table(order, latest_version=history[-1].version))
    out.print(_lines_table(order))


# worker, rebuild and status live beside the projections they run.
operate.register(app)
webhooks.register(app)
keys.register(app)


def _last_resort(error: Exception) -> tuple[str, int]:
    """A message and exit code for an error that escaped a command."""
    if isinstance(error, ValidationError):
        return _settings_problem(error), EXIT_USAGE
    if isinstance(error, InvalidCommandError):
        return str(error), EXIT_USAGE
    if isinstance(error, OrderLedgerError | OSError):
        return str(error), EXIT_FAILURE
    if isinstance(error, PersistenceError):
        return f"the event store failed: {error}", EXIT_FAILURE
    if isinstance(error, ValueError):
        return str(error), EXIT_USAGE
    return f"unexpected {type(error).__name__}: {error}", EXIT_FAILURE


def main() -> None:
    """Entry point of the `orderledger` console script."""
    try:
        app()
    except Exception as error:  # commands catch what they expect; this keeps tracebacks out
        message, code = _last_resort(error)
        Console(stderr=True, highlight=False).print(
            f"Error: {message}", markup=False, soft_wrap=True
        )
        raise SystemExit(code) from None


if __name__ == "__main__":
    main()
