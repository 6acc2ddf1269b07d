"""Helpers for the side-effects chaos test: an unreliable webhook receiver and an order writer.

The receiver is a real HTTP server on 127.0.0.1 that behaves like a flaky but honest endpoint:
it answers 500 to some requests, drops the connection on others (before or after applying the
delivery) and deduplicates by ``webhook-id``, as the Standard Webhooks guidance asks receivers
to. It records enough to tell whether every effect was applied exactly once and in order.
"""

from __future__ import annotations

import json
import random
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from projections.effects.senders import InvalidSignatureError, verify
from tests.support.orders import place_and_follow
from tests.support.processes import Deployment, Process
from tests.support.stores import open_ledger_at


@dataclass(frozen=True)
class Applied:
    """One delivery the receiver applied (the first accepted with its webhook-id)."""

    id: str
    order_id: str
    position: int
    type: str


@dataclass
class Behaviour:
    """How often the receiver misbehaves, as fractions of requests."""

    fail: float = 0.30
    drop_before_applying: float = 0.05
    drop_after_applying: float = 0.03


@dataclass
class ReceiverLog:
    """What the receiver saw, guarded by its lock."""

    requests: int = 0
    incomplete: int = 0
    """Requests cut off before their whole body arrived."""
    failed: int = 0
    dropped_before_applying: int = 0
    dropped_after_applying: int = 0
    accepted: Counter[str] = field(default_factory=Counter)
    """How many times each webhook-id was answered 2xx."""
    seen_again_after_applying: int = 0
    applied: list[Applied] = field(default_factory=list)
    """Applied deliveries in the order they were applied."""
    rejected: list[str] = field(default_factory=list)
    """Deliveries refused as malformed or wrongly signed, with the reason."""


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A sender killed mid-request resets its connection: expected, not worth a trace."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class FlakyReceiver:
    """A webhook endpoint in a thread of this process that fails, drops and deduplicates."""

    def __init__(self, seed: int, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.secret: str | None = None
        self.log = ReceiverLog()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._applied_ids: set[str] = set()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/hooks/orders"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def snapshot(self) -> ReceiverLog:
        """A copy of the log, consistent at one moment."""
        with self._lock:
            return ReceiverLog(
                requests=self.log.requests,
                incomplete=self.log.incomplete,
                failed=self.log.failed,
                dropped_before_applying=self.log.dropped_before_applying,
                dropped_after_applying=self.log.dropped_after_applying,
                accepted=Counter(self.log.accepted),
                seen_again_after_applying=self.log.seen_again_after_applying,
                applied=list(self.log.applied),
                rejected=list(self.log.rejected),
            )

    # -- handling one request ----------------------------------------------------------------

    def _incomplete(self) -> None:
        with self._lock:
            self.log.incomplete += 1

    def _fate(self) -> str:
        roll = self._rng.random()
        b = self.behaviour
        if roll < b.fail:
            return "fail"
        if roll < b.fail + b.drop_before_applying:
            return "drop"
        if roll < b.fail + b.drop_before_applying + b.drop_after_applying:
            return "apply-then-drop"
        return "apply"

    def _receive(self, headers: dict[str, str], body: bytes) -> tuple[int, bool]:
        """Decide and record one request: the status to answer and whether to drop instead."""
        with self._lock:
            self.log.requests += 1
            fate = self._fate()
            if fate == "fail":
                self.log.failed += 1
                return 500, False
            if fate == "drop":
                self.log.dropped_before_applying += 1
                return 0, True
            problem = self._problem(headers, body)
            if problem is not None:
                self.log.rejected.append(problem)
                return 400, False
            message_id = headers["webhook-id"]
            if message_id in self._applied_ids:
                self.log.seen_again_after_applying += 1
            else:
                document = json.loads(body)
                self._applied_ids.add(message_id)
                self.log.applied.append(
                    Applied(
                        id=message_id,
                        order_id=document["order_id"],
                        position=document["position"],
                        type=document["type"],
                    )
                )
            if fate == "apply-then-drop":
                self.log.dropped_after_applying += 1
                return 0, True
            self.log.accepted[message_id] += 1
            return 204, False

    def _problem(self, headers: dict[str, str], body: bytes) -> str | None:
        if self.secret is None:
            return "a delivery arrived before the receiver knew its secret"
        try:
            verify(self.secret, headers, body)
        except InvalidSignatureError as error:
            return f"bad signature: {error}"
        document = json.loads(body)
        if document.get("id") != headers.get("webhook-id"):
            return f"body id {document.get('id')!r} is not the webhook-id"
        if not isinstance(document.get("position"), int) or not document.get("order_id"):
            return f"body without a position or order id: {document!r}"
        return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                if len(body) < length:
                    # The sender died mid-request (a SIGKILLed dispatcher): nothing to answer.
                    receiver._incomplete()
                    self.close_connection = True
                    return
                headers = {key.lower(): value for key, value in self.headers.items()}
                status, drop = receiver._receive(headers, body)
                if drop:
                    # Read the request, answer nothing: the sender sees the connection die.
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: thousands of requests would bury the test's own output."""

        return Handler


# -- orders -----------------------------------------------------------------------------------


class OrderWriter:
    """Places orders from threads of this process, each through its own ledger, spread over time.

    Several threads, because one command at a time waits on each commit: on PostgreSQL a single
    thread cannot place 2,000 orders in time on a loaded machine.
    """

    def __init__(
        self,
        url: str,
        *,
        orders: int,
        seconds: float,
        seed: int,
        threads: int = 3,
    ) -> None:
        self.url = url
        self.orders = orders
        self.seconds = seconds
        self.seed = seed
        self.placed = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._run, args=(n, threads), name=f"order-writer-{n}", daemon=True
            )
            for n in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads) and not self.errors

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(30)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.errors:
            raise AssertionError(f"the writer failed: {self.errors[0]!r}") from self.errors[0]
        if any(thread.is_alive() for thread in self._threads):
            raise AssertionError(f"the writer placed only {self.placed} orders in time")

    def _run(self, first: int, step: int) -> None:
        rng = random.Random(self.seed * 1000 + first)
        ledger = open_ledger_at(self.url)
        pace = self.seconds / self.orders * step
        try:
            started = time.monotonic()
            for count in range(len(range(first, self.orders, step))):
                # Spread the orders over the run (no faster; a loaded machine may be slower).
                if self._stop.wait(max(0.0, started + count * pace - time.monotonic())):
                    return
                place_and_follow(ledger, rng)
                with self._lock:
                    self.placed += 1
        except BaseException as error:  # reported by join() in the test's thread
            with self._lock:
                self.errors.append(error)
        finally:
            ledger.close()


# -- killing processes ------------------------------------------------------------------------


class Victim:
    """A CLI worker SIGKILLed at random moments once it runs, and restarted each time.

    The moment is drawn once the process says it is running, so every kill lands in real work
    (catching up, claiming, delivering) rather than in the interpreter's start-up. Most kills
    start the replacement first and kill once it runs, so two overlap for a moment (as in a
    crash during a rolling deploy) and start-up time is not all downtime; the rest restart cold.
    """

    def __init__(
        self,
        deployment: Deployment,
        args: Sequence[str],
        rng: random.Random,
        *,
        longest: float,
        cold: float = 0.25,
    ) -> None:
        self.deployment = deployment
        self.args = list(args)
        self.rng = rng
        self.longest = longest
        self.cold = cold
        self.kills = 0
        self.process = deployment.start(*self.args)
        self._replacement: Process | None = None
        self._kill_at: float | None = None

    def tick(self, now: float, *, keep_killing: bool) -> None:
        """Kill and restart when the drawn moment has come; fail if a process died by itself."""
        for process in (self.process, self._replacement):
            if process is not None and process.popen.poll() is not None:
                raise AssertionError(
                    f"{self.args} exited with {process.popen.returncode} on its own:\n"
                    f"{process.output()[-4000:]}"
                )
        if self._replacement is not None:
            if self._runs(self._replacement):
                self._kill_and_swap(self._replacement)
            return
        if self._kill_at is None:
            if keep_killing and self._runs(self.process):
                self._kill_at = now + self.rng.uniform(0.0, self.longest)
            return
        if now < self._kill_at:
            return
        self._kill_at = None
        if self.rng.random() < self.cold:
            self._kill_and_swap(None)
        else:
            self._replacement = self.deployment.start(*self.args)

    def _runs(self, process: Process) -> bool:
        return process.running()

    def _kill_and_swap(self, replacement: Process | None) -> None:
        self.process.kill()
        self.kills += 1
        self.process = replacement or self.deployment.start(*self.args)
        self._replacement = None
