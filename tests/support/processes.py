"""Real `orderledger` processes for end-to-end tests: servers, workers and one-off commands.

Everything goes through the installed console script, with settings in the environment as an
operator would give them (the store's URL among them), output in files, and HTTP over real
loopback TCP with httpx. Each is written here once for every end-to-end test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests import LOCAL_RECEIVERS, MASTER_KEY, REPO_ROOT
from tests.support.auth import bearer
from tests.support.ports import free_port
from tests.support.waiting import wait_for

ORDERLEDGER = Path(sys.executable).with_name("orderledger")
"""The console script installed beside this interpreter, as a deployment would run it."""

STOP_TIMEOUT = 30.0
"""Longest a process may take to stop after SIGTERM before it is SIGKILLed (and fails)."""

PROCESS_TIMEOUT = 180.0
"""Longest a child process or a condition on it may take, even on a loaded machine."""

BIND_ATTEMPTS = 3
"""Tries at a free port (another process may take one between our probe and the bind)."""

HTTP_TIMEOUT = 30.0


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

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

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
        return (
            f"--- {self.name} stderr ---\n{self.stderr()}"
            f"--- {self.name} stdout ---\n{self.stdout()}"
        )

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


@dataclass
class Server(Process):
    """An `orderledger serve` process listening on base_url."""

    base_url: str = ""
    admin_token: str = ""

    def client(self, token: str | None = None, **headers: str) -> httpx.Client:
        """An HTTP client on this server, authenticated with ``token`` (admin by default)."""
        auth = bearer(token if token is not None else self.admin_token)
        return httpx.Client(
            base_url=self.base_url, headers={**auth, **headers}, timeout=HTTP_TIMEOUT
        )

    def issue_key(self, role: str, name: str) -> dict[str, Any]:
        """A new key issued over HTTP by the admin (POST /keys): its key_id, role and token."""
        with self.client() as http:
            issued = http.post("/keys", json={"role": role, "name": name})
        assert issued.status_code == 201, issued.text
        key: dict[str, Any] = issued.json()
        return key

    def anonymous(self) -> httpx.Client:
        """An HTTP client on this server that sends no key."""
        return httpx.Client(base_url=self.base_url, timeout=HTTP_TIMEOUT)


P = TypeVar("P", bound=Process)


@dataclass
class Deployment:
    """Processes sharing one store and one set of settings; none outlives the test.

    Settings are ORDERLEDGER_* environment variables (``run_projections=False`` becomes
    ``ORDERLEDGER_RUN_PROJECTIONS=False``), the store's URL among them; each process may add
    its own. Used as a context manager, a deployment SIGKILLs what still runs at the end of
    the block (as a crash would leave it); otherwise ``close`` stops it with SIGTERM.
    """

    directory: Path
    database_url: str
    settings: dict[str, object] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    """Every process started to keep running (not those run to their end)."""
    _admin_token: str | None = None

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill_all()

    def env(self, **settings: object) -> dict[str, str]:
        return cli_env(database_url=self.database_url, **{**self.settings, **settings})

    def finish(self, *args: str, timeout: float = PROCESS_TIMEOUT) -> Process:
        """Run ``orderledger ARGS`` to its end, whatever its exit code; one that has not ended
        in time is SIGKILLed and fails."""
        process = self._spawn(Process, args[0], args, {})
        try:
            process.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError(
                f"orderledger {' '.join(args)} did not finish:\n{process.output()}"
            ) from None
        return process

    def run(self, *args: str, timeout: float = PROCESS_TIMEOUT) -> str:
        """Run one command to its end; fail with its output unless it exits 0; its stdout."""
        process = self.finish(*args, timeout=timeout)
        code = process.popen.returncode
        assert code == 0, f"orderledger {' '.join(args)} exited with {code}:\n{process.output()}"
        return process.stdout()

    def create_key(self, role: str, name: str | None = None) -> str:
        """A new API key with ``role``, created through the CLI; returns its bearer token."""
        token = self.run("keys", "create", "--role", role, "--name", name or role, "--quiet")
        lines = token.splitlines()
        assert len(lines) == 1 and lines[0].strip(), f"--quiet printed {token!r}"
        return lines[0].strip()

    @property
    def admin_token(self) -> str:
        """One admin key for the deployment, created before the first server starts."""
        if self._admin_token is None:
            self._admin_token = self.create_key("admin", "e2e-admin")
        return self._admin_token

    def start(self, *args: str, **settings: object) -> Process:
        """Start ``orderledger ARGS``, named after its command, with output in files; it is
        stopped at the end."""
        return self._started(self._spawn(Process, args[0], args, settings))

    def worker(self, name: str = "worker", *args: str, **settings: object) -> Process:
        """Start `orderledger worker` and wait until it says it is running."""
        process = self._started(self._spawn(Process, name, ("worker", *args), settings))
        self.wait_for(process.running, f"{name} is running", watch=[process])
        return process

    def serve(self, name: str = "serve", *args: str, **settings: object) -> Server:
        """Start `orderledger serve` on a free loopback port and wait until /readyz says ready.

        A port taken by someone else between our probe and the server's bind is tried again
        with another one.
        """
        token = self.admin_token
        for attempt in range(1, BIND_ATTEMPTS + 1):
            port = free_port()
            server = self._started(
                self._spawn(
                    Server,
                    name,
                    ("serve", *args),
                    {"host": "127.0.0.1", "port": port, **settings},
                    base_url=f"http://127.0.0.1:{port}",
                    admin_token=token,
                )
            )
            try:
                self._wait_ready(server, port)
            except AssertionError:
                if attempt == BIND_ATTEMPTS or "address already in use" not in server.stderr():
                    raise
            else:
                return server
        raise AssertionError("unreachable: the last attempt returns or raises")

    def terminate(self, process: Process) -> int:
        """SIGTERM a worker once it says it is running (its handlers installed); its exit code."""
        self.wait_for(process.running, f"{process.name} is running", watch=[process])
        return process.terminate()

    def wait_for(
        self,
        condition: Callable[[], Any],
        what: str,
        *,
        watch: Sequence[Process] | None = None,
        timeout: float = PROCESS_TIMEOUT,
    ) -> Any:
        """Poll ``condition()``; fail with its output if a watched process (by default: any
        running now) exits meanwhile."""
        if watch is None:
            watch = [p for p in self.processes if not p.killed and p.popen.poll() is None]
        by_pid = {process.pid: process for process in watch}
        return wait_for(
            condition,
            what,
            timeout=timeout,
            processes=[process.popen for process in watch],
            output=lambda popen: by_pid[popen.pid].output(),
        )

    def close(self) -> dict[str, int]:
        """SIGTERM every process still running; return the exit code of each one stopped here
        (-9 for one that hung and was SIGKILLed), having stopped them all whatever happens."""
        codes: dict[str, int] = {}
        for process in reversed(self.processes):
            if process.killed or process.popen.returncode is not None:
                continue
            try:
                code = process.terminate()
            except AssertionError:
                code = -signal.SIGKILL
            codes[f"{process.name} (pid {process.pid})"] = code
        return codes

    def kill_all(self) -> None:
        """SIGKILL every process still running."""
        for process in self.processes:
            if process.popen.poll() is None:
                process.kill()

    def _spawn(
        self,
        kind: type[P],
        name: str,
        args: Sequence[str],
        settings: dict[str, object],
        **fields: Any,
    ) -> P:
        """``orderledger ARGS`` started with its stdout and stderr in files of the directory."""
        index = len(list(self.directory.glob("*.stdout.log")))
        stdout_path = self.directory / f"{index}-{name}.stdout.log"
        stderr_path = self.directory / f"{index}-{name}.stderr.log"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            popen = subprocess.Popen(
                [str(ORDERLEDGER), *args],
                cwd=REPO_ROOT,
                env=self.env(**settings),
                stdout=out,
                stderr=err,
            )
        return kind(name, popen, stdout_path, stderr_path, **fields)

    def _started(self, process: P) -> P:
        self.processes.append(process)
        return process

    def _wait_ready(self, server: Server, port: int) -> None:
        """Wait until this server (not another process on the port) is bound and ready."""
        bound = f"Uvicorn running on http://127.0.0.1:{port}"

        def ready() -> bool:
            if bound not in server.stderr():
                return False
            try:
                return httpx.get(f"{server.base_url}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        self.wait_for(ready, f"{server.name} answers /readyz with 200", watch=[server])


def iter_logs(deployments: list[Deployment]) -> Iterator[tuple[str, str]]:
    """(title, text) of every process's output, for failure reports."""
    for deployment in deployments:
        for process in deployment.processes:
            yield f"{process.name} (pid {process.pid}) output", process.output()
