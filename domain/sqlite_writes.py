"""One writer at a time on a SQLite file, across threads and processes, handed over at once.

SQLite lets one transaction write at a time. A writer that finds the file locked waits in
SQLite's busy handler, which sleeps 1, 2, 5, 10, 15, 20, 25... ms between tries whatever the
holder does: a command arriving while a projection batch commits waited about 10 ms on
average for a lock that was free after one. Every writer of ours (event saves, projection
batches, outbox, keys, idempotency records) first takes this lock: a thread lock within the
process, then an exclusive ``flock`` on a file beside the database across processes. Both
wake the next writer the moment the holder lets go, and the kernel lets go of a killed
process's ``flock``. Writers that do not take it (another program on the file) still queue
on SQLite's busy timeout as before.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from eventsourcing.persistence import OperationalError

LOCK_SUFFIX = "-writer"
"""The lock file's name: the database's file name with this appended."""

DEFAULT_TIMEOUT = 30.0
"""Seconds a writer of this process waits for another of this process (SQLite's busy timeout)."""


class WriteLockTimeoutError(OperationalError):
    """Another writer held the database's write lock for longer than the timeout.

    The library's error for a locked store, so callers treat both alike (the API: 503).
    """


class SQLiteWriteLock:
    """The write lock of one SQLite database file, shared by every writer of this process.

    Re-entrant within a thread (the file lock is taken by the outermost hold only). After a
    ``fork`` the child opens its own lock file, so parent and child exclude each other.
    """

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + LOCK_SUFFIX)
        self._guard = threading.Lock()
        self._pid = -1
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd = -1

    @contextmanager
    def hold(self, timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
        """Hold the lock for the body: the write transaction goes inside."""
        thread_lock = self._process_lock()
        if not thread_lock.acquire(timeout=timeout):
            raise WriteLockTimeoutError(
                f"no write lock on {self.path.name[: -len(LOCK_SUFFIX)]} within {timeout} s"
            )
        try:
            self._depth += 1
            if self._depth == 1:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            thread_lock.release()

    def _process_lock(self) -> threading.RLock:
        pid = os.getpid()
        if self._pid != pid:
            with self._guard:
                if self._pid != pid:
                    # A new process (or the first use): locks and descriptors inherited over
                    # fork belong to the parent.
                    self._thread_lock = threading.RLock()
                    self._depth = 0
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                    self._pid = pid
        return self._thread_lock


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
