"""audit verify: re-read the store and report the first broken link.

Three checks, each catching what the others cannot:

- **The chains.** Every event's hash is recomputed from the previous event of its order and
  its stored bytes; versions must follow on without a gap and in position order. This finds
  an altered payload or metadata, a deleted event inside an order, and reordered events.
- **The audit log.** Every event the audit log has recorded must still be in the store with
  the same order, version and hash, and every stored event up to the log's position must be
  in the log. This finds a deleted last event, a deleted order and an event inserted later.
- **The checkpoints.** The digest of the whole sequence is recomputed and compared with every
  checkpoint the audit log recorded and every checkpoint given (kept outside the store, so
  an attacker who rewrote the store and the audit log alike is still found out).

Events recorded before chaining began are checked for version gaps only; the report says at
which position the chain starts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any
from uuid import UUID

from domain.chain import GENESIS, event_hash, extend_digest
from domain.errors import OrderNotFoundError
from domain.eventstore import START
from domain.eventstore import Checkpoint as StoreCheckpoint
from projections.audit_log import NAME as AUDIT_LOG
from projections.audit_log import (
    AuditRow,
    Checkpoint,
    audit_rows,
    list_checkpoints,
    order_audit_rows,
)
from projections.engine.runtime import ProjectionRuntime

PAGE = 10_000


@dataclass(frozen=True)
class Problem:
    """The first broken link: what is wrong, and where."""

    kind: str
    """altered, missing_hash, version_gap, out_of_order, missing_from_store, not_in_audit_log,
    audit_log_mismatch, checkpoint_mismatch or truncated."""
    detail: str
    position: int | None = None
    order_id: str | None = None
    version: int | None = None


@dataclass
class VerifyReport:
    """What verify checked and the first problem it found (None: everything holds)."""

    head: int
    events_checked: int = 0
    aggregates_checked: int = 0
    """Orders, and the idempotency keys earlier versions stored as events beside them."""
    chained_events: int = 0
    chain_starts_at: int | None = None
    """The position of the first chained event (None: no chained event)."""
    unchained_events: int = 0
    """Events recorded before chaining began: checked for gaps only."""
    audit_log_position: int | None = None
    """How far the audit log was compared (None: it has not been built)."""
    checkpoints_checked: int = 0
    problem: Problem | None = None
    order_id: str | None = None
    """Set when one order was verified."""

    @property
    def ok(self) -> bool:
        return self.problem is None

    def document(self) -> dict[str, Any]:
        problem = self.problem
        return {
            "ok": self.ok,
            "order_id": self.order_id,
            "head": self.head,
            "events_checked": self.events_checked,
            "aggregates_checked": self.aggregates_checked,
            "chained_events": self.chained_events,
            "chain_starts_at": self.chain_starts_at,
            "unchained_events": self.unchained_events,
            "audit_log_position": self.audit_log_position,
            "checkpoints_checked": self.checkpoints_checked,
            "problem": None
            if problem is None
            else {
                "kind": problem.kind,
                "detail": problem.detail,
                "position": problem.position,
                "order_id": problem.order_id,
                "version": problem.version,
            },
        }


class _BrokenLinkError(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.detail)
        self.problem = problem


class _Chains:
    """The chain checks, fed events in position order; remembers each order's last link."""

    def __init__(self, report: VerifyReport) -> None:
        self.report = report
        self.last: dict[Any, tuple[int, bytes | None, int]] = {}
        self.digest = GENESIS

    def check(
        self,
        position: int,
        originator_id: Any,
        version: int,
        topic: str,
        state: bytes,
        link: bytes | None,
    ) -> None:
        report = self.report
        order = str(originator_id)
        previous = self.last.get(originator_id)
        expected = 1 if previous is None else previous[0] + 1
        if version > expected:
            raise _BrokenLinkError(
                Problem(
                    "version_gap",
                    f"order {order} version {version} at position {position} follows "
                    + (f"version {previous[0]}" if previous else "no earlier event")
                    + f": version {expected} was deleted or moved",
                    position,
                    order,
                    expected,
                )
            )
        if version < expected and previous is not None:
            raise _BrokenLinkError(
                Problem(
                    "out_of_order",
                    f"order {order} version {version} at position {position} comes after "
                    f"version {previous[0]} at position {previous[2]}",
                    position,
                    order,
                    version,
                )
            )
        if previous is not None and position < previous[2]:
            raise _BrokenLinkError(
                Problem(
                    "out_of_order",
                    f"order {order} version {version} at position {position} comes after "
                    f"version {previous[0]} at position {previous[2]}: an order's positions "
                    "only grow",
                    position,
                    order,
                    version,
                )
            )
        report.events_checked += 1
        if previous is None:
            report.aggregates_checked += 1
        if link is None:
            if report.chain_starts_at is not None:
                raise _BrokenLinkError(
                    Problem(
                        "missing_hash",
                        f"order {order} version {version} at position {position} has no hash, "
                        f"though the chain starts at position {report.chain_starts_at}",
                        position,
                        order,
                        version,
                    )
                )
            report.unchained_events += 1
            self.last[originator_id] = (version, None, position)
            return
        if report.chain_starts_at is None:
            report.chain_starts_at = position
        prior = previous[1] if previous is not None and previous[1] is not None else GENESIS
        if event_hash(prior, originator_id, version, topic, state) != link:
            raise _BrokenLinkError(
                Problem(
                    "altered",
                    f"order {order} version {version} at position {position}: the stored "
                    "event (its payload or its metadata) does not match its hash chain",
                    position,
                    order,
                    version,
                )
            )
        report.chained_events += 1
        self.digest = extend_digest(self.digest, position, link)
        self.last[originator_id] = (version, link, position)


class _AuditLog:
    """The audit log's rows, read in pages, compared with the store's in read order."""

    def __init__(self, rows: Iterator[AuditRow], upto: StoreCheckpoint) -> None:
        self._rows = rows
        self.upto = upto
        self._next = next(self._rows, None)

    def compare(self, at: StoreCheckpoint, order_id: str, version: int, link: bytes | None) -> None:
        self.only_in_log(before=at)
        position = at.position
        logged = self._next
        if logged is not None and (logged[4], logged[0]) == at:
            self._next = next(self._rows, None)
            if (logged[1], logged[2], logged[3]) != (order_id, version, link):
                raise _BrokenLinkError(
                    Problem(
                        "audit_log_mismatch",
                        f"position {position} holds order {order_id} version {version}, but "
                        f"the audit log recorded order {logged[1]} version {logged[2]} there "
                        "with another hash: the event was changed after it was recorded",
                        position,
                        order_id,
                        version,
                    )
                )
        elif at <= self.upto:
            raise _BrokenLinkError(
                Problem(
                    "not_in_audit_log",
                    f"order {order_id} version {version} at position {position} is not in the "
                    "audit log, which has seen every event up to position "
                    f"{self.upto.position}: it was inserted afterwards",
                    position,
                    order_id,
                    version,
                )
            )

    def only_in_log(self, before: StoreCheckpoint | None = None) -> None:
        logged = self._next
        if logged is not None and (before is None or (logged[4], logged[0]) < before):
            raise _BrokenLinkError(
                Problem(
                    "missing_from_store",
                    f"order {logged[1]} version {logged[2]} at position {logged[0]} is in the "
                    "audit log but no longer in the store: it was deleted",
                    logged[0],
                    logged[1],
                    logged[2],
                )
            )


class _Checkpoints:
    """Checkpoints in read order, each compared once the digest has passed it."""

    def __init__(self, checkpoints: Sequence[tuple[Checkpoint, str]], report: VerifyReport) -> None:
        self._pending = sorted(checkpoints, key=lambda item: item[0].at)
        self.report = report

    def reached(self, at: StoreCheckpoint, chains: _Chains) -> None:
        """Compare every checkpoint before ``at`` (all events up to it have been seen)."""
        while self._pending and self._pending[0][0].at < at:
            checkpoint, origin = self._pending.pop(0)
            self._compare(checkpoint, origin, chains)

    def end(self, end: StoreCheckpoint, chains: _Chains) -> None:
        head = end.position
        for checkpoint, origin in self._pending:
            if checkpoint.at > end:
                raise _BrokenLinkError(
                    Problem(
                        "truncated",
                        f"the store ends at position {head}, before the checkpoint at position "
                        f"{checkpoint.position} ({origin}): events were deleted from its end",
                        checkpoint.position,
                    )
                )
            self._compare(checkpoint, origin, chains)
        self._pending = []

    def _compare(self, checkpoint: Checkpoint, origin: str, chains: _Chains) -> None:
        report = self.report
        if (checkpoint.digest, checkpoint.events) != (chains.digest, report.chained_events):
            raise _BrokenLinkError(
                Problem(
                    "checkpoint_mismatch",
                    f"the {report.chained_events} chained events up to position "
                    f"{checkpoint.position} do not match the checkpoint ({origin}) of "
                    f"{checkpoint.events} events there: events were deleted, inserted or "
                    "rewritten before it",
                    checkpoint.position,
                )
            )
        report.checkpoints_checked += 1


def verify_store(runtime: ProjectionRuntime, given: Sequence[Checkpoint] = ()) -> VerifyReport:
    """Check every event in the store against its chain, the audit log and the checkpoints."""
    audit_at = _audit_checkpoint(runtime)
    source = runtime.source
    # Only up to the safe head: later events may still be committing before it in read order.
    end = source.safe_head()
    report = VerifyReport(
        head=end.position, audit_log_position=None if audit_at is None else audit_at.position
    )
    chains = _Chains(report)
    with runtime.engine.connect() as conn:
        stored = list_checkpoints(conn)
    checkpoints = _Checkpoints(
        [(c, "recorded by the audit log") for c in stored]
        + [(c, "given to verify") for c in given],
        report,
    )
    log = (
        _AuditLog(_paged_audit_rows(runtime, audit_at), audit_at) if audit_at is not None else None
    )
    try:
        after = START
        while True:
            rows = source.stored_rows(after, end, PAGE)
            if not rows:
                break
            for position, originator_id, version, topic, state, link, tx in rows:
                at = StoreCheckpoint(tx, position)
                checkpoints.reached(at, chains)
                state_bytes = state if type(state) is bytes else bytes(state)
                link_bytes = link if link is None or type(link) is bytes else bytes(link)
                if log is not None:
                    log.compare(at, str(originator_id), version, link_bytes)
                chains.check(position, originator_id, version, topic, state_bytes, link_bytes)
            after = StoreCheckpoint(rows[-1][6], rows[-1][0])
        if log is not None:
            log.only_in_log()
        checkpoints.end(end, chains)
    except _BrokenLinkError as broken:
        report.problem = broken.problem
    return report


def verify_order(runtime: ProjectionRuntime, order_id: UUID) -> VerifyReport:
    """Check one order's events against their chain and the audit log."""
    ledger = runtime.ledger
    audit_at = _audit_checkpoint(runtime)
    stored = ledger.store.select_aggregate_notifications(order_id)
    logged: list[AuditRow] = []
    if audit_at is not None:
        logged = runtime.read(
            AUDIT_LOG, partial(order_audit_rows, order_id=str(order_id), upto=audit_at)
        )
    if not stored and not logged:
        raise OrderNotFoundError(f"order {order_id} not found")
    report = VerifyReport(
        head=ledger.head_position(),
        audit_log_position=None if audit_at is None else audit_at.position,
        order_id=str(order_id),
    )
    chains = _Chains(report)
    log = _AuditLog(iter(logged), audit_at) if audit_at is not None else None
    try:
        # One order's events: their transaction ids grow with their positions.
        for n in sorted(stored, key=lambda n: n.id):
            if log is not None:
                at = StoreCheckpoint(n.tx, n.id)
                log.compare(at, str(n.originator_id), n.originator_version, n.chain_hash)
            chains.check(
                n.id, n.originator_id, n.originator_version, n.topic, n.state, n.chain_hash
            )
        if log is not None:
            log.only_in_log()
    except _BrokenLinkError as broken:
        report.problem = broken.problem
    return report


def _audit_checkpoint(runtime: ProjectionRuntime) -> StoreCheckpoint | None:
    serving = runtime.catalog.serving(AUDIT_LOG)
    return None if serving is None else serving.checkpoint


def _paged_audit_rows(runtime: ProjectionRuntime, upto: StoreCheckpoint) -> Iterator[AuditRow]:
    after = START
    while True:
        rows = runtime.read(AUDIT_LOG, partial(audit_rows, after=after, upto=upto, limit=PAGE))
        if not rows:
            return
        yield from rows
        after = StoreCheckpoint(rows[-1][4], rows[-1][0])
