"""The socket `serve --workers N` shares: connections accepted on it get TCP_NODELAY.

Without it a response on a kept-alive connection waits for the client's delayed ACK. The check
is made where asyncio decides, on a connection a real asyncio server accepted.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from api.cli.serve import labelled_tcp


def unlabelled_listener() -> socket.socket:
    """A listener made the way uvicorn makes the one it shares: protocol left at 0."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


async def nodelay_of_accepted(listener: socket.socket) -> int:
    """TCP_NODELAY on the server side of one connection accepted by asyncio on ``listener``."""
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_connect(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=listener)
    async with server:
        host, port = listener.getsockname()[:2]
        _, writer = await asyncio.open_connection(host, port)
        try:
            return await asyncio.wait_for(accepted, timeout=10)
        finally:
            writer.close()


def test_asyncio_leaves_nagle_on_for_an_unlabelled_listener() -> None:
    """The failure the labelling fixes: it shows the check below can fail."""
    assert asyncio.run(nodelay_of_accepted(unlabelled_listener())) == 0


def test_a_labelled_listener_gives_every_accepted_connection_tcp_nodelay() -> None:
    listener = labelled_tcp(unlabelled_listener())
    assert listener.proto == socket.IPPROTO_TCP
    assert asyncio.run(nodelay_of_accepted(listener)) != 0


@pytest.mark.parametrize("family", [socket.AF_UNIX])
def test_other_sockets_are_left_as_they_are(family: socket.AddressFamily) -> None:
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        assert labelled_tcp(listener) is listener
    finally:
        listener.close()
