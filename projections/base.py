"""What a projection is: a name, a version, the events it handles and its versioned tables."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from eventsourcing.domain import Aggregate
from sqlalchemy import Connection, Engine, MetaData, Table

from domain.eventstore import Checkpoint
from projections.engine.source import RecordedEvent, topics_of


class EventHandlingError(Exception):
    """A projection's handler failed on one event; the batch before it can still commit."""

    def __init__(self, index: int, recorded: RecordedEvent, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.index = index
        self.recorded = recorded
        self.cause = cause


class Batch(ABC):
    """One transaction's worth of events folded into a read model.

    ``load`` reads the rows the batch touches, ``handle`` folds each event in memory, ``flush``
    writes every changed row back: a few statements per batch instead of several per event.
    """

    def __init__(self, conn: Connection, tables: dict[str, Table]) -> None:
        self.conn = conn
        self.tables = tables

    def load(self, events: Sequence[RecordedEvent]) -> None:  # noqa: B027 - optional hook
        """Read the existing rows the events will touch."""

    @abstractmethod
    def handle(self, recorded: RecordedEvent) -> None:
        """Fold one event into the in-memory rows."""

    @abstractmethod
    def flush(self) -> None:
        """Write the changed rows."""


class Projection(ABC):
    """A read model kept from the event stream, rebuilt as a new generation of tables."""

    name: ClassVar[str]
    version: ClassVar[int]
    handles: ClassVar[tuple[type[Aggregate.Event], ...]]

    @property
    def topics(self) -> list[str]:
        return topics_of(self.handles)

    def setup(self, engine: Engine, head: Checkpoint) -> None:  # noqa: B027 - optional hook
        """Create anything shared by every generation (called once at start-up)."""

    @abstractmethod
    def define_tables(self, metadata: MetaData, suffix: str) -> dict[str, Table]:
        """Declare this projection's tables, each named ``<base><suffix>``, keyed by base name."""

    @abstractmethod
    def batch(self, conn: Connection, tables: dict[str, Table]) -> Batch:
        """A fresh batch writing to the given generation's tables."""

    def apply(
        self, conn: Connection, tables: dict[str, Table], events: Sequence[RecordedEvent]
    ) -> None:
        """Apply events in order in the caller's transaction; pinpoint the event that fails."""
        if not events:
            return
        batch = self.batch(conn, tables)
        batch.load(events)
        for index, recorded in enumerate(events):
            try:
                batch.handle(recorded)
            except Exception as error:
                raise EventHandlingError(index, recorded, error) from error
        batch.flush()


def generation_suffix(generation: int) -> str:
    """Table-name suffix of a generation: ``order_summaries_g3``."""
    return f"_g{generation}"
