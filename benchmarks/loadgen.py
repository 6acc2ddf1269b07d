"""HTTP load generator: keep-alive HTTP/1.1 clients on asyncio streams, in their own process.

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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

OPERATIONS = ("get", "place")


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
        "customer_id": f"customer-{number % 5003:05d}",
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
    if spec.operation == "get":
        ids = read_ids(spec.ids_file or "")
        if not ids:
            raise ValueError("get needs a file of existing order ids")
        rng = random.Random(spec.clients)
        return lambda _number: f"GET /orders/{rng.choice(ids)} HTTP/1.1\r\n{head}\r\n".encode()
    raise ValueError(f"unknown operation {spec.operation!r}: choose one of {OPERATIONS}")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response whole: (status, whether the server will close the connection)."""
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    status = int(head[9:12])
    marker = head.find(b"\r\ncontent-length:")
    if marker >= 0:
        value = head[marker + 17 : head.index(b"\r\n", marker + 2)]
        await reader.readexactly(int(value))
    elif b"\r\ntransfer-encoding: chunked" in head:
        await _read_chunks(reader)
    return status, b"\r\nconnection: close" in head


async def _read_chunks(reader: asyncio.StreamReader) -> None:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


async def client(
    spec: LoadSpec, make_request: Callable[[int], bytes], window: Window, first: int
) -> None:
    """One keep-alive connection sending requests until the window closes.

    Closed loop, the next request goes as soon as the last is answered. Paced, each request
    waits for its slot and its latency counts from the slot, so a slow answer that delays the
    following requests is charged to them too (no coordinated omission).
    """
    number = first
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while time.perf_counter() < window.end:
        request = make_request(number)
        due = spec.scheduled(window.begin, number)
        number += spec.clients
        if due is not None and due > time.perf_counter():
            await asyncio.sleep(due - time.perf_counter())
        started = time.perf_counter() if due is None else due
        try:
            if connection is None:
                connection = await asyncio.open_connection(spec.host, spec.port)
            reader, writer = connection
            writer.write(request)
            status, closing = await read_response(reader)
            window.record(started, time.perf_counter(), str(status))
        except (OSError, asyncio.IncompleteReadError, ValueError) as error:
            window.record(started, time.perf_counter(), type(error).__name__)
            closing = True
        if closing and connection is not None:
            connection[1].close()
            connection = None
    if connection is not None:
        connection[1].close()


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
    await asyncio.gather(*(client(spec, make_request, window, i) for i in range(spec.clients)))
    return CellResult.from_window(window, await cpu)


def main(argv: list[str]) -> int:
    spec = LoadSpec(**json.loads(argv[0]))
    print(asyncio.run(generate(spec)).to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
