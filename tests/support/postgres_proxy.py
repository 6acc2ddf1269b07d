"""A TCP proxy in front of PostgreSQL that can lose one commit acknowledgement for real.

Armed, it lets the next commit of a transaction that inserted events reach the server (a
COMMIT, or the end of a statement run in autocommit mode), waits for the server to say it
is done (the commit is durable then: its ReadyForQuery reports no transaction open), and
closes the client's connection instead of relaying that: what a network fault or a crashed
pooler does to a client.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


def _frames(buffer: bytearray) -> Iterator[tuple[bytes, bytes]]:
    """Complete (type, body) protocol messages taken off the front of ``buffer``."""
    while len(buffer) >= 5:
        (length,) = struct.unpack("!i", buffer[1:5])
        if len(buffer) < 1 + length:
            return
        kind, body = bytes(buffer[:1]), bytes(buffer[5 : 1 + length])
        del buffer[: 1 + length]
        yield kind, body


@dataclass
class _Connection:
    client: socket.socket
    server: socket.socket
    inserting_statements: set[bytes] = field(default_factory=set)
    wrote_events: bool = False


class CommitAckDroppingProxy:
    """Relays PostgreSQL's protocol between clients and ``upstream``; see the module docstring."""

    def __init__(self, upstream: tuple[str, int], table: bytes = b"orderledger_events") -> None:
        self.upstream = upstream
        self.table = table
        self.dropped = 0
        self._armed = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._connections: list[_Connection] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database_url: str) -> str:
        """``database_url`` with this proxy as its host and port (TLS off: the proxy reads it)."""
        parts = urlsplit(database_url)
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        netloc_text = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
        return urlunsplit((parts.scheme, netloc_text, parts.path, parts.query, ""))

    def arm(self) -> None:
        """Lose the acknowledgement of the next commit that writes events (once)."""
        self._armed.set()

    def close(self) -> None:
        self._listener.close()
        for connection in self._connections:
            self._close(connection)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        connection = _Connection(client, server)
        self._connections.append(connection)
        try:
            self._start_up(connection)
        except (ConnectionError, OSError):
            self._close(connection)
            return
        threading.Thread(target=self._relay_answers, args=(connection,), daemon=True).start()
        self._relay_requests(connection)

    @staticmethod
    def _start_up(connection: _Connection) -> None:
        """Refuse TLS and GSS encryption for the client, then pass its start-up message on."""
        while True:
            header = _read_exactly(connection.client, 8)
            length, code = struct.unpack("!ii", header)
            rest = _read_exactly(connection.client, length - 8)
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                connection.client.sendall(b"N")
                continue
            connection.server.sendall(header + rest)
            return

    def _relay_requests(self, connection: _Connection) -> None:
        buffer = bytearray()
        while True:
            try:
                chunk = connection.client.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                self._close(connection)
                return
            buffer += chunk
            out = bytearray()
            for kind, body in _frames(buffer):
                self._watch(connection, kind, body)
                out += kind + struct.pack("!i", len(body) + 4) + body
            try:
                connection.server.sendall(out)
            except OSError:
                self._close(connection)
                return

    def _watch(self, connection: _Connection, kind: bytes, body: bytes) -> None:
        """Follow the client's side of the transaction: does it insert events?"""
        if kind == b"P":
            name, _, rest = body.partition(b"\0")
            query = rest.split(b"\0", 1)[0].strip().upper()
            # Events, alone or beside a new customer's data keys (a WITH query first).
            if b"INSERT INTO" in query and self.table.upper() in query:
                connection.inserting_statements.add(name)
                connection.wrote_events = True
            elif query == b"ROLLBACK":
                connection.wrote_events = False
        elif kind == b"B":
            _portal, _, rest = body.partition(b"\0")
            statement = rest.split(b"\0", 1)[0]
            if statement and statement in connection.inserting_statements:
                connection.wrote_events = True
        elif kind == b"Q" and body.rstrip(b"\0").strip().upper() == b"ROLLBACK":
            connection.wrote_events = False

    def _committed_events(self, connection: _Connection, kind: bytes, body: bytes) -> bool:
        """Follow the server's side: is this the answer that an event-writing commit is done,
        to be lost because the proxy is armed?"""
        if kind == b"E":  # an error: the transaction or statement wrote nothing
            connection.wrote_events = False
        if kind != b"Z" or body != b"I" or not connection.wrote_events:
            return False
        connection.wrote_events = False
        with self._lock:
            if not self._armed.is_set():
                return False
            self._armed.clear()
            self.dropped += 1
        return True

    def _relay_answers(self, connection: _Connection) -> None:
        buffer = bytearray()
        while True:
            try:
                chunk = connection.server.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                self._close(connection)
                return
            buffer += chunk
            out = bytearray()
            for kind, body in _frames(buffer):
                if self._committed_events(connection, kind, body):
                    # Cut: the commit is done, and its answer never reaches the client.
                    self._close(connection)
                    return
                out += kind + struct.pack("!i", len(body) + 4) + body
            try:
                connection.client.sendall(out)
            except OSError:
                self._close(connection)
                return

    @staticmethod
    def _close(connection: _Connection) -> None:
        for sock in (connection.client, connection.server):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with suppress(OSError):
                sock.close()


@contextmanager
def commit_ack_dropping_proxy(database_url: str) -> Iterator[CommitAckDroppingProxy]:
    """A proxy in front of the server of ``database_url``, closed afterwards."""
    parts = urlsplit(database_url)
    proxy = CommitAckDroppingProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    try:
        yield proxy
    finally:
        proxy.close()
