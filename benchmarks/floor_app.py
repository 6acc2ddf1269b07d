"""The HTTP floor: uvicorn answering every request with one constant order, doing nothing else.

The HTTP benchmark serves this beside ``orderledger serve`` with the same number of processes,
the same uvicorn (httptools, uvloop) and the same shared TCP socket, so its get-order cells show
what HTTP alone costs on the machine: no routing, authentication, read, log line or metrics.
Run as ``python -m benchmarks.floor_app PORT PROCESSES``.
"""

from __future__ import annotations

import sys

import orjson
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.supervisors import Multiprocess

from api.cli.serve import labelled_tcp

BODY = orjson.dumps(
    {
        "order_id": "0d9b1f5e-3c1a-4f55-9a7e-2b8f6f3f8a10",
        "status": "pending_payment",
        "customer_id": "customer-00042",
        "currency": "EUR",
        "line_count": 3,
        "lines": [
            {"sku": "SKU-042", "quantity": 3, "unit_price": 1250},
            {"sku": "SKU-131", "quantity": 2, "unit_price": 899},
            {"sku": "SKU-GIFT-WRAP", "quantity": 1, "unit_price": 150},
        ],
        "total": 5698,
        "captured": 0,
        "refunded": 0,
        "refund_due": 0,
        "balance_due": 5698,
        "placed_at": "2026-11-29T12:00:00.123456Z",
        "updated_at": "2026-11-29T12:00:00.123456Z",
        "version": 1,
        "last_position": 1000000,
    }
)
HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
    (b"etag", b'"1"'),
]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main(port: int, processes: int) -> None:
    config = uvicorn.Config(
        "benchmarks.floor_app:app",
        host="127.0.0.1",
        port=port,
        workers=processes,
        log_level="warning",
        access_log=False,
    )
    if processes == 1:
        uvicorn.Server(config).run()
    else:
        Multiprocess(config, sockets=[labelled_tcp(config.bind_socket())]).run()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
