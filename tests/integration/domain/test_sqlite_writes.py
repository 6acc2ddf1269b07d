"""The SQLite write lock: one writer at a time across threads and processes, freed by a kill."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

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
