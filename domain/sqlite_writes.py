"""One writer at a time on a SQLite file, across threads and processes, handed over at once.

SQLite lets one transaction write at a time. A writer that finds the file locked waits in
SQLite's busy handler, which sleeps 1, 2, 5, 10, 15, 20, 25... ms between tries whatever the
holder does: a command arriving while a projection batch committed slept milliseconds for a
lock that was free after a fraction of one (place-order p99 about 20 ms at one client, 40 ms
over HTTP). Every writer of ours (event saves, projection batches, outbox, effects, keys,
idempotency keys) first takes this lock: within the process a queue served in arrival
order, then an exclusive ``flock`` on a file beside the database, across processes. Both wake
the next writer the moment the holder lets go, and the kernel lets go of a killed process's
``flock``. Writers that do not take it (another program on the file) still queue on SQLite's
busy timeout as before.
"""

from __future__ import annotations

import collections
import fcntl
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Generic, TypeVar

from eventsourcing.persistence import OperationalError

LOCK_SUFFIX = "-writer"
"""The lock file's name: the database's file name with this appended."""

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_TIMEOUT = 30.0
"""Seconds a writer of this process waits for another of this process (SQLite's busy timeout)."""


class WriteLockTimeoutError(OperationalError):
    """Another writer held the database's write lock for longer than the timeout.

    The library's error for a locked store, so callers treat both alike (the API: 503).
    """


class _TurnLock:
    """A re-entrant lock that threads get in the order they asked for it.

    ``threading.Lock`` lets the releasing thread take it straight back, which under the GIL
    it usually does: a projection worker committing batch after batch kept a command waiting
    for its whole pass. Here a release hands the lock to the longest waiting thread.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self._waiters: collections.deque[tuple[int, threading.Lock]] = collections.deque()

    def acquire(self, timeout: float) -> bool:
        """Take the lock (again, for its owner); False when ``timeout`` passed first."""
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return True
            if self._owner is None and not self._waiters:
                self._owner, self._depth = me, 1
                return True
            turn = threading.Lock()
            turn.acquire()
            waiting = (me, turn)
            self._waiters.append(waiting)
        if turn.acquire(timeout=timeout):
            return True  # the last holder made us the owner
        with self._mutex:
            if self._owner == me:
                return True  # handed over just as the wait ran out
            self._waiters.remove(waiting)
            return False

    def release(self) -> None:
        """Let go once; the outermost release hands the lock to the longest waiting thread."""
        with self._mutex:
            self._depth -= 1
            if self._depth:
                return
            if self._waiters:
                self._owner, turn = self._waiters.popleft()
                self._depth = 1
                turn.release()
            else:
                self._owner = None

    def waiting(self) -> int:
        """How many threads wait for the lock."""
        with self._mutex:
            return len(self._waiters)

    def owned(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self._owner == threading.get_ident()

    @property
    def depth(self) -> int:
        """How many holds the owner has (for its owner to read)."""
        return self._depth


class SQLiteWriteLock:
    """The write lock of one SQLite database file, shared by every writer of this process.

    Within the process writers take turns in the order they came (``_TurnLock``, re-entrant);
    the one whose turn it is then takes the file lock, and lets go of it before passing the
    turn on, so writers of other processes get their chance between any two of ours. After a
    ``fork`` the child opens its own lock file, so parent and child exclude each other.
    """

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + LOCK_SUFFIX)
        self._guard = threading.Lock()
        self._pid = -1
        self._turns = _TurnLock()
        self._fd = -1

    @contextmanager
    def hold(self, timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
        """Hold the lock for the body: the write transaction goes inside."""
        turns = self._process_turns()
        if not turns.acquire(timeout):
            raise WriteLockTimeoutError(
                f"no write lock on {self.path.name[: -len(LOCK_SUFFIX)]} within {timeout} s"
            )
        outermost = turns.depth == 1
        try:
            if outermost:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if outermost:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            turns.release()

    def waiting(self) -> int:
        """How many threads of this process wait for the lock."""
        return self._process_turns().waiting()

    def held(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self._process_turns().owned()

    def _process_turns(self) -> _TurnLock:
        pid = os.getpid()
        if self._pid != pid:
            with self._guard:
                if self._pid != pid:
                    # A new process (or the first use): locks and descriptors inherited over
                    # fork belong to the parent.
                    self._turns = _TurnLock()
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                    self._pid = pid
        return self._turns


_locks: dict[str, SQLiteWriteLock] = {}
_locks_guard = threading.Lock()


def sqlite_write_lock(database: str | Path) -> SQLiteWriteLock:
    """The one lock of this process for the SQLite file at ``database``."""
    key = os.path.realpath(database)
    with _locks_guard:
        lock = _locks.get(key)
        if lock is None:
            lock = _locks[key] = SQLiteWriteLock(Path(key))
        return lock


class Grouped(Generic[T, R]):
    """One command waiting for its group's transaction: what to write, then its outcome."""

    __slots__ = ("error", "finished", "item", "leads", "result", "wake")

    def __init__(self, item: T) -> None:
        self.item = item
        self.leads = False
        self.finished = False
        self.result: R | None = None
        self.error: BaseException | None = None
        self.wake = threading.Event()

    def outcome(self) -> R:
        """The result of the write, or the error it raised."""
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class GroupCommit(Generic[T, R]):
    """Commands that arrive while another is being written share the next transaction.

    A SQLite commit waits for the disk, and with one writer at a time every queued command
    waits for each commit before its own. Here the first command to arrive leads: it takes
    the write lock and writes every command queued by then (at most ``most``), in arrival
    order, in one transaction: ``write_group`` gives each its own savepoint, so one that fails
    leaves the others' writes in place, and sets each one's ``result`` or ``error``. Commands
    that arrive meanwhile queue. When the group's commit returns, the leader wakes its group
    and hands the lead to the first command queued after it. A command alone is written
    alone and waits for no company: groups form only from commands queued behind a commit.
    """

    def __init__(
        self,
        lock: SQLiteWriteLock,
        write_group: Callable[[Sequence[Grouped[T, R]]], None],
        *,
        most: int = 64,
    ) -> None:
        self._lock = lock
        self._write_group = write_group
        self.most = most
        """The most writes one transaction holds (1: each write commits alone)."""
        self._pid = os.getpid()
        self._mutex = threading.Lock()
        self._queue: collections.deque[Grouped[T, R]] = collections.deque()
        self._leading = False
        self._groups = 0
        self._grouped = 0

    def _start_afresh_after_fork(self) -> None:
        """A forked child inherits the queue of its parent's threads, which it does not have:
        a lead that no thread of the child would ever hand on."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._mutex = threading.Lock()
            self._queue = collections.deque()
            self._leading = False

    def queued(self) -> int:
        """How many writes wait for a group (a leader waiting for the lock included)."""
        with self._mutex:
            return len(self._queue)

    def totals(self) -> tuple[int, int]:
        """How many groups were written, and how many writes they held, since the start."""
        with self._mutex:
            return self._groups, self._grouped

    def submit(self, item: T) -> R:
        """Write ``item`` in the next group: its result, or the error its write raised."""
        turn: Grouped[T, R] = Grouped(item)
        self._start_afresh_after_fork()
        if self._lock.held():
            # A writer already holding the lock would wait for a leader waiting for the lock.
            with self._lock.hold():
                self._write_group([turn])
            return turn.outcome()
        with self._mutex:
            self._queue.append(turn)
            if not self._leading:
                self._leading = turn.leads = True
        if not turn.leads:
            turn.wake.wait()
        if not turn.finished:
            self._lead()
        return turn.outcome()

    def _lead(self) -> None:
        """Write the queue's head as one group (the leader is first in it), then pass on."""
        group: list[Grouped[T, R]] = []
        try:
            with self._lock.hold():
                with self._mutex:
                    while self._queue and len(group) < self.most:
                        group.append(self._queue.popleft())
                    self._groups += 1
                    self._grouped += len(group)
                self._write_group(group)
        except BaseException as error:
            # Nothing of the group was committed. Without the lock, the leader alone failed.
            with self._mutex:
                if not group:
                    group.append(self._queue.popleft())
            for turn in group:
                turn.result = None
                if turn.error is None:
                    turn.error = error
        finally:
            with self._mutex:
                if self._queue:
                    successor = self._queue[0]
                    successor.leads = True
                    successor.wake.set()
                else:
                    self._leading = False
            for turn in group:
                turn.finished = True
                turn.wake.set()
