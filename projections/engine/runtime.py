"""Wiring: the read-model engine, the tracking catalog, the event source and workers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Connection, Engine, Table, text
from sqlalchemy.exc import OperationalError, ProgrammingError

from domain.ledger import OrderLedger
from projections.base import Projection
from projections.engine.catalog import Catalog, Generation
from projections.engine.database import read_model_engine
from projections.engine.processor import ProcessorSettings
from projections.engine.source import EventSource
from projections.engine.worker import Worker
from projections.registry import all_projections

T = TypeVar("T")


class UnknownProjectionError(LookupError):
    """No projection has that name."""


class ReadModelUpgradingError(Exception):
    """The serving tables were built by another version of the projection, with columns this
    code does not find: readable again once this version's rebuild takes over."""


@dataclass
class ProjectionRuntime:
    """Everything projections need, built once at start-up."""

    engine: Engine
    ledger: OrderLedger
    catalog: Catalog
    source: EventSource
    projections: list[Projection]
    settings: ProcessorSettings

    @classmethod
    def open(
        cls,
        ledger: OrderLedger,
        database_url: str,
        *,
        projections: Sequence[Projection] | None = None,
        poll_interval: float = 0.05,
        settings: ProcessorSettings | None = None,
    ) -> ProjectionRuntime:
        engine = read_model_engine(database_url)
        chosen = list(projections) if projections is not None else all_projections()
        catalog = Catalog(engine, chosen)
        catalog.install()
        source = EventSource(ledger, poll_interval=poll_interval)
        head = source.safe_head()
        for projection in chosen:
            projection.setup(engine, head)
        return cls(
            engine=engine,
            ledger=ledger,
            catalog=catalog,
            source=source,
            projections=chosen,
            settings=settings or ProcessorSettings(),
        )

    def projection(self, name: str) -> Projection:
        for projection in self.projections:
            if projection.name == name:
                return projection
        known = ", ".join(p.name for p in self.projections)
        raise UnknownProjectionError(f"no projection named {name!r} (known: {known})")

    def start_rebuild(self, name: str, *, restart: bool = False) -> Generation:
        """Begin rebuilding ``name`` from event zero up to today's head (or return the rebuild
        in progress; ``restart`` discards it). Raises NewerVersionError when the store holds
        a newer version of the projection than this code."""
        return self.catalog.start_rebuild(
            self.projection(name).name, target=self.source.head(), restart=restart
        )

    def worker(
        self,
        only: Sequence[str] | None = None,
        *,
        settings: ProcessorSettings | None = None,
        idle_wait: float = 0.5,
        owner: str | None = None,
    ) -> Worker:
        """A worker for all projections, or only the named ones."""
        chosen = [self.projection(n) for n in only] if only else self.projections
        return Worker(
            self.catalog,
            self.source,
            chosen,
            settings=settings or self.settings,
            idle_wait=idle_wait,
            owner=owner,
        )

    @contextmanager
    def reading(self, name: str) -> Iterator[tuple[Connection, dict[str, Table]]]:
        """A read transaction on the serving generation's tables."""
        with self.engine.connect() as conn, conn.begin():
            yield conn, self._pinned_serving_tables(conn, name)

    def _pinned_serving_tables(self, conn: Connection, name: str) -> dict[str, Table]:
        """The serving tables, kept from being dropped until this read transaction ends.

        SQLite's read snapshot already keeps them; PostgreSQL needs a share lock, which the
        switch-over's DROP TABLE waits for.
        """
        for _ in range(3):
            tables = self.catalog.serving_tables(conn, name)
            if conn.dialect.name != "postgresql":
                return tables
            try:
                with conn.begin_nested():
                    for table in tables.values():
                        quoted = conn.dialect.identifier_preparer.format_table(table)
                        conn.execute(text(f"LOCK TABLE {quoted} IN ACCESS SHARE MODE"))
                return tables
            except ProgrammingError:
                continue  # dropped between the catalog read and the lock: look again
        return self.catalog.serving_tables(conn, name)

    def read(self, name: str, query: Callable[[Connection, dict[str, Table]], T]) -> T:
        """Run a query on the serving generation's tables.

        A reader that raced a rebuild's switch-over (the old tables dropped between looking up
        the generation and querying it) runs once more on the new generation.
        """
        try:
            with self.reading(name) as (conn, tables):
                return query(conn, tables)
        except (OperationalError, ProgrammingError):
            try:
                with self.reading(name) as (conn, tables):
                    return query(conn, tables)
            except (OperationalError, ProgrammingError) as error:
                serving = self.catalog.serving(name)
                version = self.projection(name).version
                if serving is None or serving.version == version:
                    raise
                raise ReadModelUpgradingError(
                    f"the {name} read model serving now was built by version "
                    f"{serving.version}; version {version} is rebuilding it, retry shortly"
                ) from error

    def close(self) -> None:
        self.source.close()
        self.engine.dispose()
