"""CLI commands for projections: worker, rebuild and status."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from api.bootstrap import dispatcher_for
from api.cli.tables import Column, JsonOption, Listing, show
from api.cli.webhooks import Reconciler
from api.settings import Settings
from domain.ledger import OrderLedger
from projections.effects.outbox import DEAD, DELIVERED, PENDING
from projections.effects.service import Effects
from projections.engine.processor import ProcessorSettings
from projections.engine.rebuild import Progress as RebuildProgress
from projections.engine.rebuild import RebuildFailedError, rebuild
from projections.engine.runtime import ProjectionRuntime, UnknownProjectionError
from projections.engine.status import ProjectionStatus, all_statuses

console = Console()
errors = Console(stderr=True)


def processor_settings(settings: Settings) -> ProcessorSettings:
    return ProcessorSettings(
        batch_size=settings.projection_batch_size, lease_ttl=settings.projection_lease_ttl
    )


def open_runtime(settings: Settings, ledger: OrderLedger) -> ProjectionRuntime:
    """The projection runtime on the configured store."""
    return ProjectionRuntime.open(
        ledger,
        settings.read_model_url,
        poll_interval=settings.projection_poll_interval,
        settings=processor_settings(settings),
    )


@contextmanager
def _runtime(database_url: str | None) -> Iterator[tuple[Settings, ProjectionRuntime]]:
    settings = Settings() if database_url is None else Settings(database_url=database_url)
    ledger = OrderLedger.from_url(settings.database_url)
    runtime = open_runtime(settings, ledger)
    try:
        yield settings, runtime
    finally:
        runtime.close()
        ledger.close()


DatabaseOption = Annotated[
    str | None,
    typer.Option("--database-url", help="Overrides ORDERLEDGER_DATABASE_URL.", show_default=False),
]


def worker(
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Run only this projection (repeatable).")
    ] = None,
    effects: Annotated[
        bool,
        typer.Option("--effects/--no-effects", help="Also deliver side effects (webhooks, email)."),
    ] = True,
    projections: Annotated[
        bool, typer.Option("--projections/--no-projections", help="Run projections.")
    ] = True,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            help="Serve Prometheus metrics (delivery counters, projection lag) on this port; "
            "no API key is asked, so bind it where only the scraper reaches.",
            show_default=False,
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Interface for --metrics-port.")
    ] = "127.0.0.1",
    database_url: DatabaseOption = None,
) -> None:
    """Run projection workers and the effect dispatcher until interrupted (SIGINT or SIGTERM)."""
    # Loaded here: they pull in the HTTP stack, which the other commands do without.
    from api.logs import configure_logging  # noqa: PLC0415
    from api.metrics import serve_worker_metrics  # noqa: PLC0415

    with _runtime(database_url) as (settings, runtime):
        configure_logging(settings.log_format, settings.log_level)
        if metrics_port is not None:
            host, port = serve_worker_metrics(runtime, settings, metrics_host, metrics_port)
            console.print(f"metrics at http://{host}:{port}/metrics")
        try:
            projection_worker = runtime.worker(only, idle_wait=settings.projection_idle_wait)
        except UnknownProjectionError as error:
            errors.print(f"[red]error:[/] {error}")
            raise typer.Exit(2) from None
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        dispatcher = None
        reconciler = None
        if effects and settings.run_effects:
            dispatcher = dispatcher_for(settings, runtime, runtime.ledger)
            dispatcher.start()
            reconciler = Reconciler(
                Effects(runtime.engine, runtime.source), settings.effect_reconcile_interval
            )
            reconciler.start()
        if projections:
            projection_worker.start()
        names = ", ".join(p.name for p in projection_worker.projections) if projections else "-"
        console.print(
            f"worker {projection_worker.owner} running: {names}"
            f"{'; delivering effects' if dispatcher else ''}"
        )
        stop.wait()
        if projections:
            projection_worker.stop()
        if reconciler is not None:
            reconciler.stop()
        if dispatcher is not None:
            dispatcher.stop()


def rebuild_command(
    name: Annotated[str | None, typer.Argument(help="Projection to rebuild.")] = None,
    all_projections: Annotated[
        bool, typer.Option("--all", help="Rebuild every projection.")
    ] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="Discard a rebuild in progress and start over.")
    ] = False,
    database_url: DatabaseOption = None,
) -> None:
    """Rebuild projections from event zero while the current tables keep serving."""
    if (name is None) == (not all_projections):
        errors.print("[red]error:[/] give a projection NAME or --all (not both)")
        raise typer.Exit(2)
    with _runtime(database_url) as (settings, runtime):
        try:
            names = (
                [runtime.projection(name).name] if name else [p.name for p in runtime.projections]
            )
        except UnknownProjectionError as error:
            errors.print(f"[red]error:[/] {error}")
            raise typer.Exit(2) from None
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]} ev/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as bar:
            for projection_name in names:
                task = bar.add_task(projection_name, total=None, rate="-")

                def show(progress: RebuildProgress, task_id: TaskID = task) -> None:
                    speed = bar.tasks[task_id].speed
                    bar.update(
                        task_id,
                        completed=progress.position,
                        total=max(progress.head, 1),
                        rate=f"{speed:,.0f}" if speed else "-",
                    )

                try:
                    row = rebuild(
                        runtime,
                        projection_name,
                        restart=restart,
                        batch_size=settings.projection_batch_size,
                        on_progress=show,
                    )
                except RebuildFailedError as error:
                    errors.print(f"[red]rebuild failed:[/] {error}")
                    raise typer.Exit(1) from None
                bar.console.print(
                    f"{projection_name}: generation {row.generation} serving at position "
                    f"{row.position}"
                )


def status(database_url: DatabaseOption = None, as_json: JsonOption = False) -> None:
    """Show each projection's position, head, lag, state and last error, and the effects."""
    with _runtime(database_url) as (settings, runtime):
        statuses = all_statuses(
            runtime.catalog, runtime.source, stalled_after=settings.projection_stalled_after
        )
        counts = Effects(runtime.engine, runtime.source).counts()
    rows = [
        {
            "name": item.name,
            "version": item.version,
            "generation": item.serving_generation,
            "position": item.position,
            "head": item.head,
            "lag_events": item.lag_events,
            "lag_seconds": round(item.lag_seconds, 1),
            "state": item.state,
            "note": _note(item),
        }
        for item in statuses
    ]
    projections = Listing(
        "projections",
        "projections",
        [
            Column("name", whole=True),
            Column("version", "ver", numeric=True),
            Column("generation", "gen", numeric=True),
            Column("position", "pos", numeric=True),
            Column("head", numeric=True),
            Column("lag_events", "lag", numeric=True),
            Column("lag_seconds", "lag s", numeric=True),
            Column("state", whole=True),
            Column("note", "note", text=lambda note: note or ""),
        ],
        rows,
    )
    dead_hint = (
        f"[red]{counts[DEAD]} dead effect(s)[/]: see `orderledger effects list --status dead`; "
        "fix the receivers, then `orderledger effects retry --all-dead`."
    )
    effects = Listing(
        "effects",
        "effects",
        [Column(column, numeric=True) for column in (PENDING, DELIVERED, DEAD)],
        [{column: counts[column] for column in (PENDING, DELIVERED, DEAD)}],
        notes=[dead_hint] if counts[DEAD] else [],
    )
    show(projections, effects, as_json=as_json)


def _note(item: ProjectionStatus) -> str | None:
    """The last error, else a rebuild in progress."""
    if item.last_error is not None:
        return (
            f"at {item.last_error.position} ({item.last_error.event_type}): "
            f"{item.last_error.message}"
        )
    if item.rebuild is not None:
        verb = "failed" if item.rebuild.failed else "building"
        return f"gen {item.rebuild.generation} {verb} {item.rebuild.position}/{item.rebuild.head}"
    return None


def register(app: typer.Typer) -> None:
    """Add the projection commands to the main CLI."""
    app.command("worker")(worker)
    app.command("rebuild")(rebuild_command)
    app.command("status")(status)
