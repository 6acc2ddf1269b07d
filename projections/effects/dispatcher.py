"""The dispatcher delivers pending effects at least once, in order per order and target.

Several dispatchers may run at once (threads, processes, machines): each claims rows with a
lease that expires if the claimer dies, renews the leases of its attempts still in flight, and
finishes a row only while its claim is still its own. Claims are taken one dispatcher at a time
(an advisory lock on PostgreSQL, the write lock on SQLite) and count the unexpired claims of
every dispatcher, so a target never has more attempts in flight than the per-target limit
across the whole deployment. A worker that finishes takes the next due effect at once: a slow
receiver holds its own workers, never a batch. An effect waits while an earlier effect of the
same order to the same target is not delivered (retrying or dead), so a receiver sees one
order's effects in position order; other orders keep flowing. Between attempts it waits with
exponential backoff and full jitter; after the last attempt the effect is dead.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

from prometheus_client import Counter
from sqlalchemy import Connection, Engine, and_, exists, func, insert, select, text, update
from sqlalchemy.orm import aliased

from projections.effects.outbox import CANCELLED, DEAD, DELIVERED, PENDING, attempts, effects
from projections.effects.senders import Effect, Outcome, Sender
from projections.effects.tally import fold_counts
from projections.engine.background import LoopThread
from projections.engine.database import db_now, write_transaction

log = logging.getLogger("orderledger.effects")

ATTEMPTS = Counter(
    "orderledger_effect_attempts",
    "Effect delivery attempts by kind and outcome (delivered, failed, dead: as in outbox_attempts)",
    ["kind", "outcome"],
)
DEAD_LETTERS = Counter("orderledger_effects_dead", "Effects that went dead", ["kind"])

COUNT_FOLD_INTERVAL = 1.0
"""Seconds between folds of the outbox's count changes (``projections.effects.tally``)."""

_CANDIDATES_PER_CLAIM = 4
"""How many due rows a claim looks at per free worker, to find some whose target has room."""


@dataclass(frozen=True)
class DispatchSettings:
    """How hard and how fast to deliver."""

    max_attempts: int = 8
    backoff_base: float = 1.0
    backoff_cap: float = 300.0
    concurrency: int = 8
    per_target: int = 4
    claim_ttl: float = 60.0
    batch_size: int = 64
    idle_wait: float = 0.2


def backoff(attempt: int, settings: DispatchSettings, rng: random.Random | None = None) -> float:
    """Full jitter: a uniform wait up to min(cap, base * 2^(attempt-1))."""
    ceiling = min(settings.backoff_cap, settings.backoff_base * 2 ** (attempt - 1))
    return (rng or random).uniform(0, ceiling)


_CLAIMED = (
    *(effects.c[field.name] for field in fields(Effect) if field.name != "attempt"),
    (effects.c.attempts + 1).label("attempt"),
)
"""What a claim reads of each outbox row: an Effect, on its next attempt."""


class Dispatcher:
    """Claims due effects and hands each to the sender of its kind."""

    def __init__(
        self,
        engine: Engine,
        senders: Mapping[str, Sender],
        owner: str,
        settings: DispatchSettings | None = None,
        *,
        on_dead: Callable[[Effect, Outcome], None] | None = None,
    ) -> None:
        self.engine = engine
        self.senders = dict(senders)
        self.owner = owner
        self.settings = settings or DispatchSettings()
        self.now = db_now(engine.dialect.name)
        self.on_dead = on_dead
        self._pool = ThreadPoolExecutor(
            max_workers=self.settings.concurrency, thread_name_prefix="orderledger-deliver"
        )
        self._in_flight: set[str] = set()
        self._in_flight_lock = threading.Lock()
        self._renewed_at = 0.0
        self._folded_at = 0.0
        self._wake = threading.Event()
        self._background = LoopThread("orderledger-dispatch")
        self._stop = self._background.stopping

    # -- running ---------------------------------------------------------------------------

    def start(self) -> None:
        self._background.start(self.run)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._background.stop(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run(self) -> None:
        """Keep every worker busy: claim as many due effects as workers are free, as they free."""
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._renew_claims()
                self._fold_counts()
                started = self._start(self.settings.concurrency - self.in_flight())
            except Exception:
                log.exception("dispatcher iteration failed; retrying")
                self._stop.wait(1.0)
                continue
            if started == 0:
                self._wake.wait(self.settings.idle_wait)

    def run_once(self) -> int:
        """Claim a batch of due effects and deliver them; returns how many were attempted."""
        claimed = self.claim(self.settings.batch_size)
        futures = [self._submit(effect) for effect in claimed]
        for future in futures:
            future.result()
        return len(claimed)

    def in_flight(self) -> int:
        """How many of this dispatcher's attempts are running."""
        with self._in_flight_lock:
            return len(self._in_flight)

    def _start(self, free: int) -> int:
        if free <= 0:
            return 0
        claimed = self.claim(min(free, self.settings.batch_size))
        for effect in claimed:
            self._submit(effect)
        return len(claimed)

    def _submit(self, effect: Effect) -> Future[None]:
        with self._in_flight_lock:
            self._in_flight.add(effect.id)
        return self._pool.submit(self._deliver_in_flight, effect)

    def _deliver_in_flight(self, effect: Effect) -> None:
        try:
            self._deliver(effect)
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(effect.id)
            self._wake.set()

    def _renew_claims(self) -> None:
        """Extend the claims of the attempts in flight, so no other dispatcher takes them over."""
        if time.monotonic() - self._renewed_at < self.settings.claim_ttl / 3:
            return
        with self._in_flight_lock:
            ids = list(self._in_flight)
        if ids:
            with write_transaction(self.engine) as conn:
                conn.execute(
                    update(effects)
                    .where(effects.c.id.in_(ids), effects.c.claimed_by == self.owner)
                    .values(claim_expires_at=self.now + self.settings.claim_ttl)
                )
        self._renewed_at = time.monotonic()

    def _fold_counts(self) -> None:
        """Fold the outbox's recorded count changes into its counts, at most once a second."""
        if time.monotonic() - self._folded_at < COUNT_FOLD_INTERVAL:
            return
        fold_counts(self.engine)
        self._folded_at = time.monotonic()

    def drain(self, timeout: float = 60.0) -> None:
        """Deliver until nothing is due (for tests and one-off runs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.run_once():
            pass

    # -- claiming ----------------------------------------------------------------------------

    def claim(self, limit: int) -> list[Effect]:
        """Take up to ``limit`` due effects whose earlier effects (same order, target) are done,
        leaving every target at most ``per_target`` unexpired claims across all dispatchers."""
        earlier = aliased(effects)
        blocked = exists().where(
            and_(
                earlier.c.order_id == effects.c.order_id,
                earlier.c.target == effects.c.target,
                earlier.c.position < effects.c.position,
                earlier.c.status.not_in([DELIVERED, CANCELLED]),
            )
        )
        with write_transaction(self.engine) as conn:
            busy = self._claims_by_target(conn)
            full = [target for target, claims in busy.items() if claims >= self.settings.per_target]
            query = (
                select(*_CLAIMED)
                .where(
                    effects.c.status == PENDING,
                    effects.c.next_attempt_at <= self.now,
                    (effects.c.claim_expires_at.is_(None))
                    | (effects.c.claim_expires_at < self.now),
                    effects.c.target.not_in(full),
                    ~blocked,
                )
                .order_by(effects.c.position)
                .limit(limit * _CANDIDATES_PER_CLAIM)
            )
            rows = []
            for row in conn.execute(query):
                if busy[row.target] < self.settings.per_target:
                    busy[row.target] += 1
                    rows.append(row)
                    if len(rows) == limit:
                        break
            if not rows:
                return []
            conn.execute(
                update(effects)
                .where(effects.c.id.in_([row.id for row in rows]))
                .values(claimed_by=self.owner, claim_expires_at=self.now + self.settings.claim_ttl)
            )
        return [Effect(**row._mapping) for row in rows]

    def _claims_by_target(self, conn: Connection) -> Tally[str]:
        """Unexpired claims per target, once no other dispatcher is claiming."""
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('outbox_effects claim'))"))
        query = (
            select(effects.c.target, func.count().label("claims"))
            .where(effects.c.status == PENDING, effects.c.claim_expires_at >= self.now)
            .group_by(effects.c.target)
        )
        return Tally({row.target: row.claims for row in conn.execute(query)})

    # -- delivering --------------------------------------------------------------------------

    def _deliver(self, effect: Effect) -> None:
        context = _context(effect)
        if self._already_delivered(effect):
            log.info("skipped (already delivered) %s", _fields(context), extra=context)
            return
        sender = self.senders.get(effect.kind)
        log.info("attempting %s", _fields(context), extra=context)
        started = time.time()
        if sender is None:
            outcome = Outcome(False, error=f"no sender configured for {effect.kind} effects")
        else:
            try:
                outcome = sender.send(effect)
            except Exception as error:
                outcome = Outcome(False, error=f"{type(error).__name__}: {error}")
        duration = (time.time() - started) * 1000
        self._finish(effect, outcome, started, duration)

    def _already_delivered(self, effect: Effect) -> bool:
        with self.engine.connect() as conn:
            status = conn.execute(
                select(effects.c.status).where(effects.c.id == effect.id)
            ).scalar_one_or_none()
        return status == DELIVERED

    def _finish(self, effect: Effect, outcome: Outcome, started: float, duration: float) -> None:
        context = {**_context(effect), "status_code": outcome.status_code}
        values: dict[str, Any] = {
            "attempts": effect.attempt,
            "total_attempts": effects.c.total_attempts + 1,
            "claimed_by": None,
            "claim_expires_at": None,
        }
        dead = False
        if outcome.delivered:
            values.update(status=DELIVERED, delivered_at=self.now, last_error=None)
        elif outcome.cancelled:
            values.update(status=CANCELLED, last_error=outcome.error)
        elif effect.attempt >= self.settings.max_attempts:
            dead = True
            values.update(status=DEAD, last_error=outcome.error)
        else:
            wait = backoff(effect.attempt, self.settings)
            values.update(next_attempt_at=self.now + wait, last_error=outcome.error)
            context["retry_in"] = round(wait, 3)
        recorded = (
            DELIVERED
            if outcome.delivered
            else CANCELLED
            if outcome.cancelled
            else ("dead" if dead else "failed")
        )
        with write_transaction(self.engine) as conn:
            total: int = conn.execute(
                select(effects.c.total_attempts).where(effects.c.id == effect.id)
            ).scalar_one()
            result = conn.execute(
                update(effects)
                .where(effects.c.id == effect.id, effects.c.claimed_by == self.owner)
                .values(**values)
            )
            if result.rowcount != 1:
                log.warning(
                    "claim lost before the attempt was recorded %s", _fields(context), extra=context
                )
                return
            conn.execute(
                insert(attempts).values(
                    effect_id=effect.id,
                    attempt=total + 1,
                    started_at=started,
                    duration_ms=duration,
                    outcome=recorded,
                    status_code=outcome.status_code,
                    error=outcome.error,
                )
            )
        ATTEMPTS.labels(effect.kind, recorded).inc()
        if outcome.delivered:
            log.info("delivered %s", _fields(context), extra=context)
        elif outcome.cancelled:
            log.info("cancelled (%s) %s", outcome.error, _fields(context), extra=context)
        elif dead:
            DEAD_LETTERS.labels(effect.kind).inc()
            context["error"] = outcome.error
            log.error("failed; effect is dead %s", _fields(context), extra=context)
            if self.on_dead is not None:
                self.on_dead(effect, outcome)
        else:
            context["error"] = outcome.error
            log.warning("failed %s", _fields(context), extra=context)


def _context(effect: Effect) -> dict[str, Any]:
    return {
        "effect_id": effect.id,
        "order_id": effect.order_id,
        "position": effect.position,
        "attempt": effect.attempt,
        "effect": effect.effect,
    }


def _fields(context: dict[str, Any]) -> str:
    """The context as key=value pairs, so plain-text logs carry it too."""
    return " ".join(f"{key}={value}" for key, value in context.items() if value is not None)
