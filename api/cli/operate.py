"""orderledger worker, rebuild and status: run and watch the projections and the outbox."""

from __future__ import annotations

import signal
import threading
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

from api.bootstrap import background, effects_of
from api.cli.common import EXIT_USAGE, DatabaseUrlOption, fail, opened
from api.cli.tables import Column, JsonOption, Listing, show
from projections.effects.outbox import DEAD, STATUSES
from projections.engine.rebuild import Progress as RebuildProgress
from projections.engine.rebuild import RebuildFailedError, rebuild
from projections.engine.runtime import UnknownProjectionError
from projections.engine.status import ProjectionStatus, all_statuses
from projections.engine.worker import worker_id

console = Console()


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
    database_url: DatabaseUrlOption = None,
) -> None:
    """Run projection workers and the effect dispatcher until interrupted (SIGINT or SIGTERM)."""
    # Loaded here: they pull in the HTTP stack, which the other commands do without.
    from api.logs import configure_logging  # noqa: PLC0415
    from api.metrics import serve_worker_metrics  # noqa: PLC0415

    with opened(database_url) as system:
        settings, runtime = system.settings, system.runtime
        configure_logging(settings.log_format, settings.log_level)
        if metrics_port is not None:
            host, port = serve_worker_metrics(runtime, settings, metrics_host, metrics_port)
            console.print(f"metrics at http://{host}:{port}/metrics")
        try:
            running = background(
                settings, runtime, only=only, projections=projections, effects=effects
            )
        except UnknownProjectionError as error:
            fail(str(error), EXIT_USAGE)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        running.start()
        names = ", ".join(p.name for p in running.worker.projections) if running.worker else "-"
        owner = running.worker.owner if running.worker else worker_id()
        delivering = "; delivering effects" if running.dispatcher else ""
        console.print(f"worker {owner} running: {names}{delivering}")
        stop.wait()
        running.stop()


def rebuild_command(
    name: Annotated[str | None, typer.Argument(help="Projection to rebuild.")] = None,
    all_projections: Annotated[
        bool, typer.Option("--all", help="Rebuild every projection.")
    ] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="Discard a rebuild in progress and start over.")
    ] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Rebuild projections from event zero while the current tables keep serving."""
    if (name is None) == (not all_projections):
        fail("give a projection NAME or --all (not both)", EXIT_USAGE)
    with opened(database_url) as system:
        settings, runtime = system.settings, system.runtime
        try:
            names = (
                [runtime.projection(name).name] if name else [p.name for p in runtime.projections]
            )
        except UnknownProjectionError as error:
            fail(str(error), EXIT_USAGE)
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
                    fail(f"rebuild failed: {error}")
                bar.console.print(
                    f"{projection_name}: generation {row.generation} serving at position "
                    f"{row.position}"
                )


def status(database_url: DatabaseUrlOption = None, as_json: JsonOption = False) -> None:
    """Show each projection's position, head, lag, state and last error, and the effects."""
    with opened(database_url) as system:
        settings, runtime = system.settings, system.runtime
        statuses = all_statuses(
            runtime.catalog, runtime.source, stalled_after=settings.projection_stalled_after
        )
        counts = effects_of(settings, runtime).counts()
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
            "oldest_transaction_seconds": item.oldest_transaction_seconds,
        }
        for item in statuses
    ]
    held = max((item.oldest_transaction_seconds for item in statuses), default=0.0)
    held_hint = (
        f"[yellow]a transaction open for {held:.0f} s[/] holds every projection at the events "
        "recorded since it began; see pg_stat_activity (docs/projections.md)."
    )
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
        notes=[held_hint] if held > HELD_NOTE_SECONDS else [],
    )
    dead_hint = (
        f"[red]{counts[DEAD]} dead effect(s)[/]: see `orderledger effects list --status dead`; "
        "fix the receivers, then `orderledger effects retry --all-dead`."
    )
    effects = Listing(
        "effects",
        "effects",
        [Column(column, numeric=True) for column in STATUSES],
        [{column: counts[column] for column in STATUSES}],
        notes=[dead_hint] if counts[DEAD] else [],
    )
    show(projections, effects, as_json=as_json)


HELD_NOTE_SECONDS = 5.0
"""A transaction older than this is worth a line under the projections (the ledger's own
sessions end idle ones at 5 s)."""


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
