"""Waiting for a condition: poll it, fail naming what never happened."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

WAIT_TIMEOUT = 30.0
"""Seconds a test waits for something by default; generous for a loaded machine."""


def wait_for(
    condition: Callable[[], Any],
    what: str,
    *,
    timeout: float = WAIT_TIMEOUT,
    interval: float = 0.02,
    processes: Sequence[subprocess.Popen[bytes]] = (),
    output: Callable[[subprocess.Popen[bytes]], str] = lambda _process: "",
) -> Any:
    """Poll until ``condition()`` is truthy and return it; fail if a watched process died."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        for process in processes:
            if process.poll() is not None:
                raise AssertionError(
                    f"process {process.pid} exited with {process.returncode} "
                    f"while waiting until {what}:\n{output(process)}"
                )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting until {what}")
        time.sleep(interval)
