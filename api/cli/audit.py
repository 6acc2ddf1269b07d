"""orderledger audit: an order's history, the audit log, checkpoints and verify."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table
from typer.core import TyperGroup

from api.cli import orders
from api.cli.common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    DatabaseUrlOption,
    fail,
    opened,
    parse_moment,
    stdout,
)
from domain.errors import OrderNotFoundError
from projections.audit_log import (
    NAME,
    AuditEntry,
    AuditFilters,
    Checkpoint,
    InvalidCheckpointError,
    checkpoints_from_json,
    list_audit_entries,
    list_checkpoints,
    request_checkpoint,
)
from projections.engine.runtime import ProjectionRuntime
from projections.verify import VerifyReport, verify_order, verify_store

PAGE = 1000
COLUMNS = (
    "position",
    "order_id",
    "version",
    "event_type",
    "recorded_at",
    "event_id",
    "actor_kind",
    "actor_id",
    "actor_name",
    "actor_role",
    "request_id",
    "correlation_id",
    "causation_id",
    "chain_hash",
)


class _AuditGroup(TyperGroup):
    """``orderledger audit ORDER_ID`` still prints the order's history (``audit history``)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["history", *args]
        return super().parse_args(ctx, args)


audit_app = typer.Typer(
    cls=_AuditGroup,
    help="An order's history (orderledger audit ORDER_ID), the audit log, checkpoints and verify.",
    no_args_is_help=True,
)
audit_app.command("history")(orders.audit)


def _moment(text: str | None, option: str) -> datetime | None:
    return None if text is None else parse_moment(text, option).astimezone(UTC)


def _entries(
    runtime: ProjectionRuntime, filters: AuditFilters, order: Literal["asc", "desc"], limit: int
) -> Iterator[AuditEntry]:
    cursor: str | None = None
    left = limit or None
    while left is None or left > 0:
        size = PAGE if left is None else min(PAGE, left)
        page = runtime.read(
            NAME,
            partial(list_audit_entries, filters=filters, limit=size, cursor=cursor, order=order),
        )
        yield from page.items
        if left is not None:
            left -= len(page.items)
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def _row(entry: AuditEntry) -> dict[str, Any]:
    row = {column: getattr(entry, column) for column in COLUMNS}
    row["recorded_at"] = entry.recorded_at.isoformat()
    row["chain_hash"] = entry.chain_hash.hex() if entry.chain_hash is not None else None
    return row


@audit_app.command("log")
def log(
    actor: Annotated[
        str | None, typer.Option(help="The actor's id: an API key id, or the OS user.")
    ] = None,
    order_id: Annotated[str | None, typer.Option("--order", help="An order's id.")] = None,
    event_type: Annotated[
        str | None, typer.Option("--type", help="An event type, e.g. PaymentCaptured.")
    ] = None,
    correlation_id: Annotated[str | None, typer.Option("--correlation-id")] = None,
    recorded_from: Annotated[
        str | None, typer.Option("--from", help="Recorded at or after (ISO 8601).")
    ] = None,
    recorded_to: Annotated[
        str | None, typer.Option("--to", help="Recorded before (ISO 8601).")
    ] = None,
    output: Annotated[
        Literal["table", "json", "csv"], typer.Option("--format", help="table, json or csv.")
    ] = "table",
    order: Annotated[
        Literal["desc", "asc"], typer.Option(help="By position: newest first, or oldest.")
    ] = "desc",
    limit: Annotated[int, typer.Option(help="At most this many events; 0: all.")] = 100,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Who recorded which event, on whose request, filtered; as a table, JSON or CSV."""
    if limit < 0:
        fail("--limit must be 0 (all) or more", EXIT_USAGE)
    filters = AuditFilters(
        actor=actor,
        order_id=order_id,
        event_type=event_type,
        correlation_id=correlation_id,
        recorded_from=_moment(recorded_from, "--from"),
        recorded_to=_moment(recorded_to, "--to"),
    )
    with opened(database_url) as system:
        runtime = system.runtime
        serving = runtime.catalog.serving(NAME)
        if serving is None:
            fail("the audit log has not been built yet: run orderledger worker")
        entries = _entries(runtime, filters, order, limit)
        if output == "json":
            _write_json(entries)
        elif output == "csv":
            writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            for entry in entries:
                writer.writerow(_row(entry))
        else:
            stdout().print(_log_table(list(entries)))
        head = runtime.source.head()
        if serving.position < head:
            typer.echo(
                f"The audit log has seen events up to position {serving.position} of {head}.",
                err=True,
            )


def _write_json(entries: Iterator[AuditEntry]) -> None:
    """A JSON array, written as it is read (an export may hold millions of events)."""
    out = sys.stdout
    out.write("[")
    for index, entry in enumerate(entries):
        out.write(("," if index else "") + "\n" + json.dumps(_row(entry)))
    out.write("\n]\n")


def _log_table(entries: list[AuditEntry]) -> Table:
    table = Table(title="Audit log", title_justify="left")
    for column in ("Position", "Recorded at (UTC)", "Event", "Order", "Version", "Actor"):
        table.add_column(column, justify="right" if column in ("Position", "Version") else "left")
    table.add_column("Request")
    table.add_column("Correlation")
    for entry in entries:
        who = f"{entry.actor_kind} {entry.actor_id}"
        if entry.actor_name:
            who += f" ({entry.actor_name})"
        table.add_row(
            str(entry.position),
            entry.recorded_at.astimezone(UTC).isoformat(timespec="milliseconds"),
            entry.event_type,
            entry.order_id,
            str(entry.version),
            who,
            entry.request_id,
            entry.correlation_id,
        )
    return table


@audit_app.command("checkpoint")
def checkpoint(
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Also write it to this file.", show_default=False),
    ] = None,
    list_all: Annotated[
        bool, typer.Option("--list", help="Print every checkpoint recorded instead.")
    ] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Record the digest of every event the audit log has seen; print it as JSON.

    Keep it outside the store and give it back to verify with --checkpoint.
    """
    with opened(database_url) as system:
        runtime = system.runtime
        if list_all:
            with runtime.engine.connect() as conn:
                found: Any = [c.document() for c in list_checkpoints(conn)]
        else:
            try:
                taken = request_checkpoint(runtime.engine, runtime.catalog.serving_tables)
            except LookupError:
                fail("the audit log has not been built yet: run orderledger worker")
            if taken is None:
                fail("the audit log has seen no chained event yet: nothing to checkpoint")
            found = taken.document()
    text = json.dumps(found, indent=2)
    if output is not None:
        output.write_text(text + "\n")
    typer.echo(text)


@audit_app.command("verify")
def verify(
    order_id: Annotated[
        str | None, typer.Option("--order", help="Verify this order only.", show_default=False)
    ] = None,
    checkpoint_files: Annotated[
        list[Path] | None,
        typer.Option(
            "--checkpoint",
            help="A checkpoint file kept outside the store (one, a list, or what GET "
            "/audit/checkpoints returned); repeatable.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Re-read the store; report the first broken link. Exit status 1 if there is one."""
    uuid = orders.parse_order_id(order_id) if order_id is not None else None
    given: list[Checkpoint] = []
    for path in checkpoint_files or []:
        try:
            given += checkpoints_from_json(path.read_text())
        except (OSError, InvalidCheckpointError) as error:
            fail(f"--checkpoint {path}: {error}", EXIT_USAGE)
    if uuid is not None and given:
        fail("checkpoints cover the whole store: give --checkpoint without --order", EXIT_USAGE)
    with opened(database_url) as system:
        try:
            report = (
                verify_order(system.runtime, uuid)
                if uuid is not None
                else verify_store(system.runtime, given)
            )
        except OrderNotFoundError as error:
            fail(str(error))
    if as_json:
        typer.echo(json.dumps(report.document(), indent=2))
    else:
        _print_report(report)
    if not report.ok:
        raise typer.Exit(EXIT_FAILURE)


def _print_report(report: VerifyReport) -> None:
    out = stdout()
    scope = f"order {report.order_id}" if report.order_id else "the store"
    out.print(
        f"Checked {report.events_checked} events of {scope} "
        f"({report.chained_events} chained) up to position {report.head}.",
        soft_wrap=True,
    )
    if report.chain_starts_at is not None:
        out.print(
            f"The chain starts at position {report.chain_starts_at}"
            + (
                f"; {report.unchained_events} earlier events were recorded before chaining "
                "and are checked for gaps only."
                if report.unchained_events
                else "."
            ),
            soft_wrap=True,
        )
    if report.audit_log_position is None:
        out.print("The audit log has not been built: it was not compared.")
    else:
        out.print(f"Compared with the audit log up to position {report.audit_log_position}.")
    if not report.order_id:
        out.print(f"Checkpoints matched: {report.checkpoints_checked}.")
    problem = report.problem
    if problem is None:
        out.print("OK: every link holds.")
        return
    out.print(f"BROKEN ({problem.kind}): {problem.detail}", markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
