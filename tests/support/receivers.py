"""Real receivers on loopback for side effects: a webhook endpoint and an SMTP server."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from projections.effects.senders import SmtpSettings
from projections.effects.targets import TargetPolicy, parse_networks
from tests import LOCAL_RECEIVERS
from tests.support.ports import free_port

LOCAL_TARGETS = TargetPolicy(parse_networks(LOCAL_RECEIVERS))
"""The webhook target policy of the tests: public addresses and the local receivers."""


def _placeholder(port: int) -> socket.socket:
    """Hold the port while a server is down: bound but not listening, so connections are refused."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", port))
    return holder


# -- the webhook receiver ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the receiver saw it, and how it answered."""

    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    status: int
    answered_at: float

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def document(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class WebhookReceiver:
    """A real HTTP endpoint on 127.0.0.1 that records every request and answers as told.

    Behaviour: ``status`` (204 unless a test sets another); ``fail_fraction`` of requests
    answer 503 at random (seeded); ``failing_orders`` answer 500 for those order ids;
    ``fail_first`` answers 500 to the first n requests carrying each webhook-id; ``hang``
    seconds pass before every answer; ``go_down()`` closes the socket so connections are
    refused until ``come_up()``.
    """

    def __init__(self, *, seed: int = 7) -> None:
        self.requests: list[ReceivedRequest] = []
        self.fail_fraction = 0.0
        self.failing_orders: set[str] = set()
        self.fail_first = 0
        self.hang = 0.0
        self.status = 204
        """What it answers when no failure mode applies."""
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._port = free_port()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._holder: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/hooks"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def come_up(self) -> None:
        if self._holder is not None:
            self._holder.close()
            self._holder = None
        server = ThreadingHTTPServer(("127.0.0.1", self._port), self._handler_class())
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def go_down(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        if self._thread is not None:
            self._thread.join(5)
        self._holder = _placeholder(self._port)

    def close(self) -> None:
        self.go_down()
        if self._holder is not None:
            self._holder.close()
            self._holder = None

    # -- what it saw -------------------------------------------------------------------------

    def received(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self.requests)

    def accepted(self) -> list[ReceivedRequest]:
        """The requests it answered with a 2xx."""
        return [r for r in self.received() if 200 <= r.status < 300]

    def accepted_ids(self) -> list[str]:
        return [r.webhook_id for r in self.accepted()]

    # -- answering -------------------------------------------------------------------------

    def _answer(self, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            message_id = headers.get("webhook-id", "")
            self._seen[message_id] = self._seen.get(message_id, 0) + 1
            try:
                order_id = json.loads(body).get("order_id")
            except ValueError:
                order_id = None
            if order_id in self.failing_orders:
                return 500
            if self._seen[message_id] <= self.fail_first:
                return 500
            if self.fail_fraction and self._rng.random() < self.fail_fraction:
                return 503
            return self.status

    def _record(self, request: ReceivedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                arrived = time.time()
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = receiver._answer(headers, body)
                time.sleep(receiver.hang)
                receiver._record(
                    ReceivedRequest(self.path, headers, body, arrived, status, time.time())
                )
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Keep test output quiet."""

        return Handler


# -- the SMTP server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedEmail:
    mail_from: str
    rcpt_tos: list[str]
    message: Message
    received_at: float


class _Recorder:
    def __init__(self, inbox: list[ReceivedEmail], lock: threading.Lock, refused: set[str]) -> None:
        self.inbox = inbox
        self.lock = lock
        self.refused = refused

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.refused:
            return f"550 5.1.1 <{address}>: mailbox {address} unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 - aiosmtpd's hook name
        content = envelope.content
        raw = content if isinstance(content, bytes) else str(content).encode()
        with self.lock:
            self.inbox.append(
                ReceivedEmail(
                    mail_from=str(envelope.mail_from),
                    rcpt_tos=list(envelope.rcpt_tos),
                    message=message_from_bytes(raw),
                    received_at=time.time(),
                )
            )
        return "250 Message accepted for delivery"


class SmtpServer:
    """A real SMTP server (aiosmtpd) on 127.0.0.1; ``go_down()`` refuses connections."""

    def __init__(self) -> None:
        self.inbox: list[ReceivedEmail] = []
        self.refused: set[str] = set()
        """Recipients whose mailbox the server refuses (550)."""
        self._lock = threading.Lock()
        self.port = free_port()
        self._controller: Controller | None = None
        self._holder: socket.socket | None = None

    @property
    def settings(self) -> SmtpSettings:
        return SmtpSettings(host="127.0.0.1", port=self.port, sender="orders@shop.example")

    def come_up(self) -> None:
        if self._holder is not None:
            self._holder.close()
            self._holder = None
        controller = Controller(
            _Recorder(self.inbox, self._lock, self.refused), hostname="127.0.0.1", port=self.port
        )
        controller.start()
        self._controller = controller

    def go_down(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        if self._holder is None:
            self._holder = _placeholder(self.port)

    def close(self) -> None:
        self.go_down()
        if self._holder is not None:
            self._holder.close()
            self._holder = None

    def received(self) -> list[ReceivedEmail]:
        with self._lock:
            return list(self.inbox)
