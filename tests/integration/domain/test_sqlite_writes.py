"""The SQLite write lock: one writer at a time across threads and processes, freed by a kill."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import IntegrityError, PersistenceError, StoredEvent
from sqlalchemy import text

from domain.ledger import OrderLedger
from domain.sqlite_writes import (
    LOCK_SUFFIX,
    SQLiteWriteLock,
    WriteLockTimeoutError,
    sqlite_write_lock,
)
from projections.engine.database import read_model_engine, write_transaction
from tests import REPO_ROOT
from tests.support.stores import open_ledger_at
from tests.support.waiting import wait_for

ROOT = REPO_ROOT
HOLDER = """
import sys, time
from domain.sqlite_writes import sqlite_write_lock
with sqlite_write_lock(sys.argv[1]).hold():
    print("held", flush=True)
    time.sleep(600)
"""
WATCH = 0.5
"""Seconds a blocked writer is watched to see that it stays blocked (an observation window)."""
DONE = 30.0
"""Seconds allowed for a released writer to finish (a generous bound, not a timing claim)."""


@contextmanager
def held_by_another_process(database: Path) -> Iterator[subprocess.Popen[str]]:
    """A process holding the database's write lock until it is killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(database)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


class Attempt:
    """Runs a write in a thread; tells whether it finished and what it returned or raised."""

    def __init__(self, write: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._write = write
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self._write()
        except BaseException as error:  # reported to the test
            self.error = error
        finally:
            self.finished.set()

    def outcome(self) -> Any:
        assert self.finished.wait(DONE), "the write never finished"
        if self.error is not None:
            raise self.error
        return self.result


def hold_briefly(lock: SQLiteWriteLock, timeout: float = DONE) -> str:
    with lock.hold(timeout):
        return "written"


class TestTheLock:
    def test_one_lock_per_file_whatever_the_spelling(self, tmp_path: Path) -> None:
        database = tmp_path / "store.db"
        same = tmp_path / "sub" / ".." / "store.db"
        (tmp_path / "sub").mkdir()
        assert sqlite_write_lock(database) is sqlite_write_lock(same)
        assert sqlite_write_lock(database) is not sqlite_write_lock(tmp_path / "other.db")
        assert sqlite_write_lock(database).path == tmp_path / ("store.db" + LOCK_SUFFIX)

    def test_a_thread_may_hold_it_again_inside_its_own_hold(self, tmp_path: Path) -> None:
        lock = sqlite_write_lock(tmp_path / "store.db")
        with lock.hold(), lock.hold():
            other = Attempt(lambda: hold_briefly(lock))
            assert not other.finished.wait(WATCH), "another thread wrote during a nested hold"
        assert other.outcome() == "written"

    def test_a_released_lock_goes_to_the_waiting_thread_not_back_to_the_releaser(
        self, tmp_path: Path
    ) -> None:
        lock = sqlite_write_lock(tmp_path / "store.db")
        entered: list[str] = []

        def write(name: str) -> None:
            with lock.hold():
                entered.append(name)

        with lock.hold():
            waiters = [Attempt(partial(write, f"waiter-{n}")) for n in range(3)]
            for count, _ in enumerate(waiters, start=1):
                # Each asks in turn: wait until the queue holds it before starting the next.
                wait_for(
                    lambda c=count: lock.waiting() >= c,
                    "the condition held",
                    timeout=DONE,
                    interval=0.001,
                )
        # Straight back in, as a worker committing batch after batch does.
        write("releaser")
        for waiter in waiters:
            waiter.outcome()
        assert entered == ["waiter-0", "waiter-1", "waiter-2", "releaser"]

    def test_another_thread_waits_and_then_gives_up_with_the_stores_error(
        self, tmp_path: Path
    ) -> None:
        lock = sqlite_write_lock(tmp_path / "store.db")
        with lock.hold():
            other = Attempt(lambda: hold_briefly(lock, timeout=0.2))
            with pytest.raises(WriteLockTimeoutError, match=r"no write lock on store\.db"):
                other.outcome()
        assert Attempt(lambda: hold_briefly(lock)).outcome() == "written"

    def test_another_process_waits_until_the_holder_is_killed(self, tmp_path: Path) -> None:
        lock = sqlite_write_lock(tmp_path / "store.db")
        with held_by_another_process(tmp_path / "store.db") as holder:
            waiting = Attempt(lambda: hold_briefly(lock))
            assert not waiting.finished.wait(WATCH), "wrote while another process held the lock"
            os.kill(holder.pid, signal.SIGKILL)
            assert waiting.outcome() == "written"

    def test_a_forked_child_is_a_writer_of_its_own(self, tmp_path: Path) -> None:
        lock = sqlite_write_lock(tmp_path / "store.db")
        context = multiprocessing.get_context("fork")
        with lock.hold():
            # The child inherits a held lock; it must still wait for the parent.
            child = context.Process(target=_hold_and_exit, args=(str(tmp_path / "store.db"),))
            child.start()
            child.join(WATCH)
            assert child.is_alive(), "the forked child wrote while its parent held the lock"
        child.join(DONE)
        assert child.exitcode == 0


def _hold_and_exit(database: str) -> None:
    with sqlite_write_lock(database).hold():
        pass


class TestWritersTakeIt:
    """Every writer of ours queues on the lock: here it is held by another process."""

    def test_an_event_save_waits_for_it(self, sqlite_url: str, tmp_path: Path) -> None:
        ledger = open_ledger_at(sqlite_url)
        try:
            with held_by_another_process(tmp_path / "orderledger.db") as holder:
                placing = Attempt(
                    lambda: ledger.place_order(
                        customer_id="c-1",
                        currency="EUR",
                        lines=[{"sku": "SKU-1", "quantity": 1, "unit_price": 500}],
                    )
                )
                assert not placing.finished.wait(WATCH), "saved while the lock was held"
                os.kill(holder.pid, signal.SIGKILL)
                placed = placing.outcome()
            assert ledger.get_order(placed.order_id).version == placed.version
        finally:
            ledger.close()

    def test_a_read_model_write_waits_for_it(self, sqlite_url: str, tmp_path: Path) -> None:
        engine = read_model_engine(sqlite_url)

        def write() -> int:
            with write_transaction(engine) as conn:
                conn.execute(text("CREATE TABLE IF NOT EXISTS probe (n INTEGER)"))
                conn.execute(text("INSERT INTO probe VALUES (1)"))
            with engine.connect() as conn:
                return int(conn.execute(text("SELECT count(*) FROM probe")).scalar_one())

        try:
            with held_by_another_process(tmp_path / "orderledger.db") as holder:
                writing = Attempt(write)
                assert not writing.finished.wait(WATCH), "wrote while the lock was held"
                os.kill(holder.pid, signal.SIGKILL)
                assert writing.outcome() == 1
        finally:
            engine.dispose()

    def test_a_failed_write_rolls_back_and_lets_the_next_writer_in(
        self, sqlite_url: str, tmp_path: Path
    ) -> None:
        engine = read_model_engine(sqlite_url)
        lock = sqlite_write_lock(tmp_path / "orderledger.db")
        try:
            with write_transaction(engine) as conn:
                conn.execute(text("CREATE TABLE probe (n INTEGER)"))
            with pytest.raises(RuntimeError, match="half-way"), write_transaction(engine) as conn:
                conn.execute(text("INSERT INTO probe VALUES (1)"))
                raise RuntimeError("half-way")
            assert Attempt(lambda: hold_briefly(lock, timeout=0.5)).outcome() == "written"
            with engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM probe")).scalar_one() == 0
        finally:
            engine.dispose()


def _event(originator_id: UUID, state: bytes = b"{}", topic: str = "tests:Probe") -> StoredEvent:
    return StoredEvent(originator_id=originator_id, originator_version=1, topic=topic, state=state)


class TestSavesThatQueueTogether:
    """Saves that queue behind a commit share the next transaction, each in its savepoint."""

    @pytest.fixture
    def ledger(self, sqlite_url: str) -> Iterator[OrderLedger]:
        ledger = open_ledger_at(sqlite_url)
        try:
            yield ledger
        finally:
            ledger.close()

    @staticmethod
    def queue_behind_the_lock(ledger: OrderLedger, saves: list[Callable[[], Any]]) -> list[Attempt]:
        """Start each save in its own thread while the lock is held, each queued before the
        next starts (so the group's order is the list's)."""
        groups = ledger.recorder.groups
        attempts = []
        for count, save in enumerate(saves, start=1):
            attempts.append(Attempt(save))
            wait_for(lambda c=count: groups.queued() >= c, "the save queued", timeout=DONE)
        return attempts

    def test_saves_queued_during_a_commit_share_one_transaction(self, ledger: OrderLedger) -> None:
        recorder = ledger.recorder
        groups_before, saves_before = recorder.groups.totals()
        with recorder.write_lock.hold():
            placing = self.queue_behind_the_lock(
                ledger,
                [
                    partial(
                        ledger.place_order,
                        customer_id=f"c-{n}",
                        currency="EUR",
                        lines=[{"sku": "SKU-1", "quantity": 1, "unit_price": 500 + n}],
                        shipping_address=f"{n} Queue Street",
                    )
                    for n in range(8)
                ],
            )
            assert not placing[0].finished.wait(WATCH), "saved while the lock was held"
        placed = [attempt.outcome() for attempt in placing]
        assert recorder.groups.totals() == (groups_before + 1, saves_before + 8)
        for n, order in enumerate(placed):
            stored = ledger.get_order(order.order_id)
            assert stored.lines["SKU-1"].unit_price == 500 + n
            assert stored.shipping_address == f"{n} Queue Street"
        history = [ledger.order_history(order.order_id) for order in placed]
        positions = [max(entry.position for entry in entries) for entries in history]
        assert positions == sorted(positions), "the group was written out of arrival order"

    def test_a_conflicting_save_fails_alone_and_the_rest_of_its_group_commits(
        self, ledger: OrderLedger
    ) -> None:
        recorder = ledger.recorder
        shared, other = uuid4(), uuid4()
        with recorder.write_lock.hold():
            first, clash, unrelated = self.queue_behind_the_lock(
                ledger,
                [
                    partial(recorder.insert_events, [_event(shared, b'{"n": 1}')]),
                    partial(recorder.insert_events, [_event(shared, b'{"n": 2}')]),
                    partial(recorder.insert_events, [_event(other, b'{"n": 3}')]),
                ],
            )
        first_positions, unrelated_positions = first.outcome(), unrelated.outcome()
        with pytest.raises(IntegrityError):
            clash.outcome()
        assert [e.state for e in recorder.select_events(shared)] == [b'{"n": 1}']
        assert [e.state for e in recorder.select_events(other)] == [b'{"n": 3}']
        assert len(first_positions) == len(unrelated_positions) == 1
        assert unrelated_positions[0] > first_positions[0]

    def test_a_group_whose_transaction_is_lost_writes_nothing_and_fails_every_save(
        self, ledger: OrderLedger, sqlite_url: str
    ) -> None:
        recorder = ledger.recorder
        table = recorder.events_table_name
        with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as conn:
            # As an I/O error does: SQLite rolls the whole transaction back mid-group.
            conn.execute(
                f"CREATE TRIGGER lose_the_transaction BEFORE INSERT ON {table} "
                "WHEN NEW.topic = 'tests:Lost' BEGIN SELECT RAISE(ROLLBACK, 'lost'); END"
            )
        ids = [uuid4() for _ in range(3)]
        with recorder.write_lock.hold():
            before, lost, after = self.queue_behind_the_lock(
                ledger,
                [
                    partial(recorder.insert_events, [_event(ids[0])]),
                    partial(recorder.insert_events, [_event(ids[1], topic="tests:Lost")]),
                    partial(recorder.insert_events, [_event(ids[2])]),
                ],
            )
        for attempt in (before, lost, after):
            with pytest.raises(PersistenceError):
                attempt.outcome()
        for originator_id in ids:
            assert recorder.select_events(originator_id) == []
        assert recorder.insert_events([_event(uuid4())]), "the next save is written as usual"

    def test_a_save_by_a_thread_holding_the_lock_does_not_wait_for_a_leader(
        self, ledger: OrderLedger
    ) -> None:
        recorder = ledger.recorder

        def hold_and_save() -> Sequence[int] | None:
            with recorder.write_lock.hold():
                # Another save leads the next group, and waits for the lock this thread holds.
                leader = self.queue_behind_the_lock(
                    ledger, [partial(recorder.insert_events, [_event(uuid4())])]
                )[0]
                positions = recorder.insert_events([_event(uuid4())])
                assert not leader.finished.is_set()
            leader.outcome()
            return positions

        assert Attempt(hold_and_save).outcome(), "the save under the lock never finished"

    def test_many_threads_saving_at_once_lose_and_confuse_nothing(
        self, ledger: OrderLedger
    ) -> None:
        recorder = ledger.recorder
        rounds, threads = 25, 16

        def save_many(thread: int) -> list[tuple[UUID, int]]:
            saved = []
            for n in range(rounds):
                originator_id = uuid4()
                state = f'{{"thread": {thread}, "n": {n}}}'.encode()
                positions = recorder.insert_events([_event(originator_id, state)])
                assert positions is not None
                saved.append((originator_id, positions[0]))
            return saved

        attempts = [Attempt(partial(save_many, thread)) for thread in range(threads)]
        saved = [pair for attempt in attempts for pair in attempt.outcome()]
        assert len({position for _, position in saved}) == rounds * threads
        for originator_id, position in saved:
            (stored,) = recorder.select_events(originator_id)
            assert recorder.select_notifications(position, 1)[0].originator_id == originator_id
            assert stored.originator_id == originator_id
        assert recorder.groups.totals()[1] == rounds * threads

    def test_a_child_forked_while_a_save_waited_saves_on_its_own(self, ledger: OrderLedger) -> None:
        recorder = ledger.recorder
        context = multiprocessing.get_context("fork")
        with recorder.write_lock.hold():
            # The parent's next group has a leader, waiting for the lock: the child must not
            # wait for that leader, which is not in the child.
            (waiting,) = self.queue_behind_the_lock(
                ledger, [partial(recorder.insert_events, [_event(uuid4())])]
            )
            child = context.Process(target=_save_one, args=(ledger,))
            child.start()
        waiting.outcome()
        child.join(DONE)
        assert child.exitcode == 0, "the forked child's save never finished"


def _save_one(ledger: OrderLedger) -> None:
    assert ledger.recorder.insert_events([_event(uuid4())])
