"""api/http/transport.py subclasses uvicorn's HttpToolsProtocol: its source must be the one
our coalescing transport was written and measured against."""

from __future__ import annotations

import hashlib
import inspect
from importlib.metadata import version

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.http.transport import CoalescingHttpToolsProtocol

CHECKED_VERSION = "0.55.0"
CHECKED_SOURCE = "ec7f438cf5cec43e89f2636c4521d2937acfcbd11db4cfdc627dad3b9962ff3f"
"""SHA-256 of HttpToolsProtocol's source in that version. When it changes, read the new
protocol: every write must still go through ``self.transport`` set in ``connection_made``
(CoalescingTransport holds the head until the body), and flow control must still reach the
real transport; then record the new version and digest here."""


def test_uvicorn_is_the_minor_version_the_protocol_was_checked_against() -> None:
    assert version("uvicorn").split(".")[:2] == CHECKED_VERSION.split(".")[:2]


def test_the_subclassed_protocol_is_the_one_checked() -> None:
    source = inspect.getsource(HttpToolsProtocol)
    assert hashlib.sha256(source.encode()).hexdigest() == CHECKED_SOURCE, (
        f"uvicorn's HttpToolsProtocol changed since {CHECKED_VERSION}: re-check "
        "api/http/transport.py against it, then update CHECKED_SOURCE"
    )


def test_only_the_connection_is_overridden() -> None:
    overridden = {
        name
        for name, value in vars(CoalescingHttpToolsProtocol).items()
        if callable(value) and not name.startswith("__")
    }
    assert overridden == {"connection_made"}
