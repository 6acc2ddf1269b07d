"""Real `orderledger` processes for end-to-end tests: servers, workers and the keys CLI.

Everything goes through the installed console script, with settings in the environment as an
operator would give them, and HTTP over real loopback TCP with httpx.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests import REPO_ROOT
from tests.support.auth import bearer
from tests.support.ports import free_port
from tests.support.processes import ORDERLEDGER, Process, cli_env, spawn, wait_watching

START_TIMEOUT = 60.0
"""Longest a server may take to answer /readyz, even on a loaded machine."""


BIND_ATTEMPTS = 3
"""Tries at a free port (another process may take one between our probe and the bind)."""

CLI_TIMEOUT = 60.0
HTTP_TIMEOUT = 30.0


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


@dataclass
class Deployment:
    """Processes sharing one store and one set of settings; none outlives the test.

    Settings are ORDERLEDGER_* environment variables (``run_projections=False`` becomes
    ``ORDERLEDGER_RUN_PROJECTIONS=False``); each process may add its own.
    """

    directory: Path
    database_url: str
    settings: dict[str, object] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    _admin_token: str | None = None

    def env(self, **settings: object) -> dict[str, str]:
        return cli_env(database_url=self.database_url, **{**self.settings, **settings})

    def cli(self, *args: str) -> str:
        """Run one CLI command on this store (``--database-url``) to its end; fail with its
        output unless it exits 0."""
        completed = subprocess.run(
            [str(ORDERLEDGER), *args, "--database-url", self.database_url],
            cwd=REPO_ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        assert completed.returncode == 0, (
            f"orderledger {' '.join(args)} exited with {completed.returncode}:\n"
            f"{completed.stderr}{completed.stdout}"
        )
        return completed.stdout

    def create_key(self, role: str, name: str | None = None) -> str:
        """A new API key with ``role``, created through the CLI; returns its bearer token."""
        token = self.cli("keys", "create", "--role", role, "--name", name or role, "--quiet")
        lines = token.splitlines()
        assert len(lines) == 1 and lines[0].strip(), f"--quiet printed {token!r}"
        return lines[0].strip()

    @property
    def admin_token(self) -> str:
        """One admin key for the deployment, created before the first server starts."""
        if self._admin_token is None:
            self._admin_token = self.create_key("admin", "e2e-admin")
        return self._admin_token

    def start(self, name: str, *args: str, **settings: object) -> Process:
        """Start ``orderledger ARGS`` with output in files; it is stopped at the end."""
        process = Process(name, *self._spawn(name, args, settings))
        self.processes.append(process)
        return process

    def serve(self, name: str = "serve", *args: str, **settings: object) -> Server:
        """Start `orderledger serve` on a free loopback port and wait until /readyz says ready.

        A port taken by someone else between our probe and the server's bind is tried again
        with another one.
        """
        token = self.admin_token
        for attempt in range(1, BIND_ATTEMPTS + 1):
            port = free_port()
            spawned = self._spawn(
                name, ("serve", *args), {"host": "127.0.0.1", "port": port, **settings}
            )
            server = Server(name, *spawned, base_url=f"http://127.0.0.1:{port}", admin_token=token)
            self.processes.append(server)
            try:
                self._wait_ready(server, port)
            except AssertionError:
                if attempt == BIND_ATTEMPTS or "address already in use" not in server.stderr():
                    raise
            else:
                return server
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _spawn(
        self, name: str, args: tuple[str, ...], settings: dict[str, object]
    ) -> tuple[subprocess.Popen[bytes], Path, Path]:
        process = spawn(self.directory, name, args, self.env(**settings))
        return process.popen, process.stdout_path, process.stderr_path

    def worker(self, name: str = "worker", *args: str, **settings: object) -> Process:
        """Start `orderledger worker` and wait until it says it is running."""
        process = self.start(name, "worker", *args, **settings)
        self.wait_for(
            lambda: " running: " in process.output(), f"{name} is running", watch=[process]
        )
        return process

    def wait_for(
        self,
        condition: Callable[[], Any],
        what: str,
        *,
        watch: list[Process] | None = None,
        timeout: float = START_TIMEOUT,
    ) -> Any:
        """Poll ``condition()``; fail with its output if a watched process (by default: any
        running now) exits meanwhile."""
        candidates = self.processes if watch is None else watch
        running = [p for p in candidates if not p.killed and p.popen.poll() is None]
        return wait_watching(condition, what, running, timeout)

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


def iter_logs(deployments: list[Deployment]) -> Iterator[tuple[str, str]]:
    """(title, text) of every process's output, for failure reports."""
    for deployment in deployments:
        for process in deployment.processes:
            yield f"{process.name} (pid {process.pid}) output", process.output()
