"""HTTP load generator: keep-alive HTTP/1.1 clients on asyncio protocols, in their own process.

The HTTP benchmark starts it as ``python -m benchmarks.loadgen SPEC_JSON`` so that the server
under test does not share an interpreter (or its lock) with the clients. Requests are written
as bytes and responses read by their ``Content-Length``: no HTTP library, so the generator
costs little CPU on a 2-core machine, and it measures and reports that CPU itself.
It prints one JSON line: a ``CellResult``.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any, cast

try:
    import uvloop
except ImportError:  # not on Windows
    uvloop = None  # type: ignore[assignment]

OPERATIONS = ("get", "get-route", "place", "history", "list")
"""get-route reads as get does with the ids in upper case: the read shortcut leaves those to
the FastAPI route, so its cells measure the path every other read route takes. history reads
an order's events (GET /orders/{id}/history); list a customer's newest 20 orders (GET
/orders?customer_id=...&limit=20)."""

LIST_LIMIT = 20


def customer_of(number: int) -> str:
    """The customer of the ``number``-th order place_order_body makes."""
    return f"customer-{number % 5003:05d}"


@dataclass(frozen=True)
class LoadSpec:
    """One cell: which requests, how many clients at once, for how long, against which server."""

    operation: str
    clients: int
    warmup: float
    seconds: float
    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    ids_file: str | None = None
    """Order ids to read (one a line), for ``get``."""
    begin_at: float = 0.0
    """When the clients start (``time.time()``; 0: at once), so other processes can measure
    the same window."""
    rate: float = 0.0
    """Requests per second for all clients together, evenly spaced (0: each client sends its
    next request as soon as the last is answered)."""

    def scheduled(self, begin: float, number: int) -> float | None:
        """When request ``number`` is due when paced (its latency counts from then), or None."""
        return begin + number / self.rate if self.rate else None


@dataclass
class Window:
    """The measured part of a run: responses that arrive inside it count, the rest do not."""

    begin: float
    start: float
    end: float
    samples: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, spec: LoadSpec) -> Window:
        """The spec's window on this process's ``perf_counter`` clock."""
        now = time.time()
        begin = time.perf_counter() + max(0.0, (spec.begin_at or now) - now)
        return cls(begin, begin + spec.warmup, begin + spec.warmup + spec.seconds)

    def record(self, started: float, finished: float, status: str) -> None:
        if self.start <= finished <= self.end:
            self.samples.append(finished - started)
            self.statuses[status] += 1


@dataclass(frozen=True)
class CellResult:
    """What one cell measured: throughput, latency percentiles, errors and CPU used."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    statuses: dict[str, int]
    cpu_seconds: float
    """CPU of the measuring process over the window (the generator, or the direct process)."""

    @property
    def rate(self) -> float:
        """Successful responses per second."""
        return (self.requests - self.errors) / self.seconds

    @classmethod
    def from_window(cls, window: Window, cpu_seconds: float) -> CellResult:
        ordered = sorted(window.samples)

        def percentile(fraction: float) -> float:
            if not ordered:
                return float("nan")
            return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000

        ok = {status for status in window.statuses if status.startswith(("2", "3"))}
        return cls(
            requests=len(ordered),
            seconds=window.end - window.start,
            p50_ms=percentile(0.5),
            p99_ms=percentile(0.99),
            max_ms=ordered[-1] * 1000 if ordered else float("nan"),
            errors=sum(count for status, count in window.statuses.items() if status not in ok),
            statuses=dict(window.statuses),
            cpu_seconds=cpu_seconds,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CellResult:
        return cls(**json.loads(text))


def place_order_body(number: int) -> dict[str, Any]:
    """A realistic order: three lines, a shipping address and a unique client reference."""
    return {
        "customer_id": customer_of(number),
        "currency": ("EUR", "USD", "GBP")[number % 3],
        "lines": [
            {"sku": f"SKU-{number % 97:03d}", "quantity": 1 + number % 4, "unit_price": 1250},
            {"sku": f"SKU-{100 + number % 89:03d}", "quantity": 2, "unit_price": 899},
            {"sku": "SKU-GIFT-WRAP", "quantity": 1, "unit_price": 150},
        ],
        "shipping_address": "1 Example Street, 10115 Berlin, DE",
        "client_reference": f"load-{uuid.uuid4().hex[:16]}",
    }


def read_ids(path: str) -> list[str]:
    with open(path, encoding="ascii") as ids:
        return [line.strip() for line in ids if line.strip()]


# -- HTTP/1.1 over asyncio streams -------------------------------------------------------------


def request_maker(spec: LoadSpec) -> Callable[[int], bytes]:
    """A function from a request number to the whole request, as bytes."""
    head = f"Host: {spec.host}:{spec.port}\r\n"
    if spec.token:
        head += f"Authorization: Bearer {spec.token}\r\n"
    if spec.operation == "place":

        def place(number: int) -> bytes:
            body = json.dumps(place_order_body(number), separators=(",", ":")).encode()
            return (
                f"POST /orders HTTP/1.1\r\n{head}Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body

        return place
    rng = random.Random(spec.clients)
    if spec.operation == "list":
        return lambda _number: (
            f"GET /orders?customer_id={customer_of(rng.randrange(5003))}&limit={LIST_LIMIT} "
            f"HTTP/1.1\r\n{head}\r\n"
        ).encode()
    if spec.operation in ("get", "get-route", "history"):
        ids = read_ids(spec.ids_file or "")
        if not ids:
            raise ValueError(f"{spec.operation} needs a file of existing order ids")
        if spec.operation == "get-route":
            ids = [order_id.upper() for order_id in ids]
        suffix = "/history" if spec.operation == "history" else ""
        return lambda _number: (
            f"GET /orders/{rng.choice(ids)}{suffix} HTTP/1.1\r\n{head}\r\n"
        ).encode()
    raise ValueError(f"unknown operation {spec.operation!r}: choose one of {OPERATIONS}")


RETRY_DELAY = 0.01
"""Seconds before a client whose connection failed connects again."""


class Client(asyncio.Protocol):
    """One keep-alive connection, driven by callbacks: no coroutine, stream or future per request.

    Closed loop, the next request goes out from ``data_received`` as soon as the last response
    is whole. Paced, each request waits for its slot and its latency counts from the slot, so a
    slow answer that delays the following requests is charged to them too (no coordinated
    omission). Responses are read by their ``Content-Length`` (or to the last chunk).
    """

    def __init__(
        self, spec: LoadSpec, make_request: Callable[[int], bytes], window: Window, first: int
    ) -> None:
        self.spec = spec
        self.make_request = make_request
        self.window = window
        self.number = first
        self.done = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.request = b""
        self.started: float | None = None
        """When the request in flight was due (None: none in flight)."""

    # -- the connection ----------------------------------------------------------------------

    def connect(self) -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(
            loop.create_connection(lambda: self, self.spec.host, self.spec.port)
        )
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        error = task.exception()
        if error is not None:
            now = time.perf_counter()
            self.window.record(now, now, type(error).__name__)
            self._again_later()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.buffer = b""
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.started is not None:
            self.window.record(self.started, time.perf_counter(), "ConnectionLost")
            self.started = None
        self._again_later()

    def _again_later(self) -> None:
        if self.done.done():
            return
        if time.perf_counter() >= self.window.end:
            self.done.set_result(None)
            return
        asyncio.get_running_loop().call_later(RETRY_DELAY, self.connect)

    # -- requests ----------------------------------------------------------------------------

    def _next(self) -> None:
        """Send the next request, now or in its slot; or finish when the window has closed."""
        now = time.perf_counter()
        if now >= self.window.end:
            self._finish()
            return
        due = self.spec.scheduled(self.window.begin, self.number)
        self.request = self.make_request(self.number)
        self.number += self.spec.clients
        if due is not None and due > now:
            asyncio.get_running_loop().call_later(due - now, self._send, due, self.transport)
        else:
            self._send(now if due is None else due, self.transport)

    def _send(self, due: float, transport: asyncio.Transport | None) -> None:
        if transport is None or transport is not self.transport:
            return  # the connection was lost meanwhile; the new one sends its own
        self.started = due
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.started is not None:
            whole = _response_length(self.buffer)
            if whole is None:
                return
            head = self.buffer[: whole[0]].lower()
            self.buffer = self.buffer[whole[1] :]
            self.window.record(self.started, time.perf_counter(), head[9:12].decode())
            self.started = None
            if b"\r\nconnection: close" in head:
                if self.transport is not None:
                    self.transport.close()  # connection_lost connects again
                return
            self._next()

    def _finish(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if not self.done.done():
            self.done.set_result(None)


def _response_length(buffer: bytes) -> tuple[int, int] | None:
    """(end of the head, end of the response) of the first response in ``buffer``, or None
    while it is not all there."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buffer[:head_end].lower()
    marker = head.find(b"\r\ncontent-length:")
    if marker >= 0:
        line_end = head.find(b"\r\n", marker + 2)
        value = head[marker + 17 : line_end if line_end >= 0 else len(head)]
        end = head_end + 4 + int(value)
        return (head_end, end) if len(buffer) >= end else None
    if b"\r\ntransfer-encoding: chunked" in head:
        last = buffer.find(b"\r\n0\r\n\r\n", head_end + 2)
        return (head_end, last + 7) if last >= 0 else None
    return head_end, head_end + 4


async def cpu_over(window: Window) -> float:
    """This process's CPU seconds between the window's start and end."""
    await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
    before = time.process_time()
    await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
    return time.process_time() - before


async def generate(spec: LoadSpec) -> CellResult:
    make_request = request_maker(spec)
    window = Window.of(spec)
    await asyncio.sleep(max(0.0, window.begin - time.perf_counter()))
    cpu = asyncio.create_task(cpu_over(window))
    clients = [Client(spec, make_request, window, i) for i in range(spec.clients)]
    for one in clients:
        one.connect()
    await asyncio.gather(*(one.done for one in clients))
    return CellResult.from_window(window, await cpu)


def main(argv: list[str]) -> int:
    spec = LoadSpec(**json.loads(argv[0]))
    print(_run(generate(spec)).to_json(), flush=True)
    return 0


def _run(main: Coroutine[Any, Any, CellResult]) -> CellResult:
    """Run on uvloop when it is installed (it is, with the server's extras): less CPU per
    request than asyncio's own loop, so more of the machine is left to the server."""
    if uvloop is None:
        return asyncio.run(main)
    return uvloop.run(main)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
