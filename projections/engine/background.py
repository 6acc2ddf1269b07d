"""A loop run in a daemon thread until it is asked to stop: the worker, dispatcher, reconciler."""

from __future__ import annotations

import threading
from collections.abc import Callable


class LoopThread:
    """Runs a loop in a daemon thread named ``name``; the loop ends once ``stopping`` is set."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loop: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Ask the loop to end and wait up to ``timeout`` seconds for its thread."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
