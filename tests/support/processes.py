"""Child `orderledger` processes: started with settings in the environment, output in files,
stopped or SIGKILLed, each written here once for every end-to-end test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import LOCAL_RECEIVERS, MASTER_KEY, REPO_ROOT
from tests.support.waiting import wait_for

ORDERLEDGER = Path(sys.executable).with_name("orderledger")
"""The console script installed beside this interpreter, as a deployment would run it."""

STOP_TIMEOUT = 30.0
"""Longest a process may take to stop after SIGTERM before it is SIGKILLed (and fails)."""

PROCESS_TIMEOUT = 180.0
"""Longest a child process or a condition on it may take, even on a loaded machine."""


def cli_env(**settings: object) -> dict[str, str]:
    """The environment for a CLI child: ours, plus ORDERLEDGER_<NAME> for each setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERLEDGER_")}
    env["ORDERLEDGER_WEBHOOK_ALLOWED_NETWORKS"] = LOCAL_RECEIVERS
    env["ORDERLEDGER_MASTER_KEY"] = MASTER_KEY
    env.update({f"ORDERLEDGER_{key.upper()}": str(value) for key, value in settings.items()})
    env["COLUMNS"] = "240"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Process:
    """One child process with its stdout and stderr in files."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """Every complete line on stderr, each of which must be one JSON object (the log
        format); the last piece may be a line still being written."""
        records = []
        for line in self.stderr().split("\n")[:-1]:
            if not line.strip():
                continue
            record = json.loads(line)
            assert isinstance(record, dict), f"{self.name} logged {line!r}"
            records.append(record)
        return records

    def output(self) -> str:
        """Both streams, labelled, for failure messages."""
        stdout = self.stdout_path.read_text(errors="replace")
        return f"--- {self.name} stderr ---\n{self.stderr()}--- {self.name} stdout ---\n{stdout}"

    def running(self) -> bool:
        """Whether the process says it is running (as `orderledger worker` does)."""
        return " running: " in self.output()

    def terminate(self) -> int:
        """SIGTERM and wait; a process that does not stop in time is SIGKILLed and fails."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM:\n{self.output()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is given back."""
        self.killed = True
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(STOP_TIMEOUT)


def spawn(directory: Path, name: str, args: Sequence[str], env: dict[str, str]) -> Process:
    """Start ``orderledger ARGS`` with its stdout and stderr in files of ``directory``."""
    index = len(list(directory.glob("*.stdout.log")))
    stdout_path = directory / f"{index}-{name}.stdout.log"
    stderr_path = directory / f"{index}-{name}.stderr.log"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        popen = subprocess.Popen(
            [str(ORDERLEDGER), *args], cwd=REPO_ROOT, env=env, stdout=out, stderr=err
        )
    return Process(name, popen, stdout_path, stderr_path)


def wait_watching(
    condition: Callable[[], Any],
    what: str,
    watch: Sequence[Process],
    timeout: float = PROCESS_TIMEOUT,
) -> Any:
    """Poll ``condition()``; fail with a watched process's output if it exits meanwhile."""
    by_pid = {process.pid: process for process in watch}
    return wait_for(
        condition,
        what,
        timeout=timeout,
        processes=[process.popen for process in watch],
        output=lambda popen: by_pid[popen.pid].output(),
    )


class CliProcesses:
    """CLI children sharing one set of settings, killed at the end if still running."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.started: list[Process] = []

    def start(self, *args: str) -> Process:
        process = spawn(self.directory, args[0], args, self.env)
        self.started.append(process)
        return process

    def run(self, *args: str, timeout: float = PROCESS_TIMEOUT) -> str:
        """Run a command to its end; fail with its output unless it exits 0."""
        process = self.start(*args)
        try:
            code = process.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError(f"{args} did not finish: {process.output()}") from None
        assert code == 0, f"{args} exited with {code}: {process.output()}"
        return process.output()

    def terminate(self, process: Process) -> int:
        """SIGTERM once the worker is running (its handlers installed); wait for it to stop."""
        wait_watching(process.running, "the worker is running", [process])
        return process.terminate()

    def kill_all(self) -> None:
        for process in self.started:
            if process.popen.poll() is None:
                process.kill()


@contextmanager
def cli_processes(directory: Path, **settings: object) -> Iterator[CliProcesses]:
    """CLI children sharing one set of ORDERLEDGER_* settings; none outlives the block."""
    processes = CliProcesses(directory, cli_env(**settings))
    try:
        yield processes
    finally:
        processes.kill_all()
