"""The coalescing transport, on a real event loop and a real socket pair: what is written in one
turn of the loop reaches the peer as one write, in order, and nothing is lost on close."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from api.http.transport import CoalescingTransport


class CountingTransport:
    """The real transport, counting the writes that reach it (each is one send on the socket)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


@asynccontextmanager
async def connected() -> AsyncIterator[
    tuple[CoalescingTransport, CountingTransport, socket.socket]
]:
    """A coalescing transport over a real socket transport, and the peer socket."""
    ours, peer = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    counting = CountingTransport(transport)  # type: ignore[arg-type]
    coalescing = CoalescingTransport(counting, loop)  # type: ignore[arg-type]
    peer.setblocking(False)
    try:
        yield coalescing, counting, peer
    finally:
        transport.abort()
        peer.close()


async def received(peer: socket.socket, until: Callable[[bytes], bool]) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while not until(data):
        chunk = await asyncio.wait_for(loop.sock_recv(peer, 65536), 5)
        if not chunk:
            break
        data += chunk
    return data


def run(test: Callable[[], Any]) -> None:
    asyncio.run(test())


class TestCoalescingTransport:
    def test_a_head_and_its_body_reach_the_socket_as_one_write_at_once(self) -> None:
        async def scenario() -> None:
            async with connected() as (coalescing, counting, peer):
                head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
                coalescing.write(head)
                assert counting.writes == []  # held for the body
                assert coalescing.get_write_buffer_size() == len(head)
                coalescing.write(memoryview(b"{}"))
                assert counting.writes == [head + b"{}"]  # sent with it, not at the turn's end
                assert await received(peer, lambda data: len(data) >= len(head) + 2) == (
                    head + b"{}"
                )

        run(scenario)

    def test_an_empty_body_sends_the_head(self) -> None:
        async def scenario() -> None:
            async with connected() as (coalescing, counting, _peer):
                coalescing.write(b"HTTP/1.1 304 Not Modified\r\n\r\n")
                coalescing.write(b"")
                assert counting.writes == [b"HTTP/1.1 304 Not Modified\r\n\r\n"]

        run(scenario)

    def test_a_write_with_none_after_it_goes_at_the_end_of_the_turn(self) -> None:
        async def scenario() -> None:
            async with connected() as (coalescing, counting, peer):
                coalescing.writelines([b"", b"alone"])
                assert counting.writes == []
                await asyncio.sleep(0)
                assert counting.writes == [b"alone"]
                assert await received(peer, lambda data: len(data) >= 5) == b"alone"

        run(scenario)

    def test_close_sends_what_is_held_first(self) -> None:
        async def scenario() -> None:
            async with connected() as (coalescing, counting, peer):
                coalescing.write(b"last words")
                coalescing.close()
                assert counting.writes == [b"last words"]
                assert await received(peer, lambda data: False) == b"last words"  # then EOF

        run(scenario)

    def test_abort_drops_what_is_held(self) -> None:
        async def scenario() -> None:
            async with connected() as (coalescing, counting, peer):
                coalescing.write(b"never sent")
                coalescing.abort()
                await asyncio.sleep(0.05)
                assert counting.writes == []
                assert await received(peer, lambda data: False) == b""

        run(scenario)
