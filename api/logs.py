"""Structured logs: one JSON object per line, and one line per HTTP request with its request id.

The request line replaces uvicorn's access log: it knows the route template, the latency, the
API key and the request id, which a client may send in ``X-Request-ID`` to follow a call across
services. Every response carries the id back, problems and 401s included.
"""

from __future__ import annotations

import logging
import logging.config
import random
import re
import time
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.metrics import count_request, route_template
from api.settings import LogFormat

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's coloured copy of the message
}
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

request_log = logging.getLogger("orderledger.http")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, pid and the record's extras."""

    _formatted_second: tuple[int, str] = (-1, "")

    def _second(self, second: int) -> str:
        """The record's second in ISO 8601 (UTC), formatted once per second, not per record."""
        cached, text = self._formatted_second
        if cached != second:
            text = time.strftime(_TS_FORMAT, time.gmtime(second))
            self._formatted_second = (second, text)
        return text

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": f"{self._second(int(record.created))}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def logging_config(log_format: LogFormat, level: str) -> dict[str, Any]:
    """A dictConfig: everything (uvicorn's errors too) to stderr in one format; no access log."""
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"} if log_format == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            # Our request line replaces it.
            "uvicorn.access": {"handlers": [], "propagate": False, "level": "WARNING"},
        },
    }


def configure_logging(log_format: LogFormat, level: str) -> None:
    """Send this process's logs to stderr in the chosen format."""
    logging.config.dictConfig(logging_config(log_format, level))
    lean_log_records()


def lean_log_records() -> None:
    """Make records without the caller, thread, process-name and task look-ups that neither
    format prints: together they cost more than formatting the record, and an API process
    makes one record per request. Called by every serving process, however its logging was
    configured (uvicorn applies ``logging_config`` itself)."""
    logging._srcfile = None  # the documented switch: no walking the stack for the caller
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined,unused-ignore]  # 3.12+


def request_id(sent: str | None) -> str:
    """The client's request id when it is sane (1-128 of [A-Za-z0-9._-]), else a new one."""
    if sent is not None and _SANE_REQUEST_ID.fullmatch(sent):
        return sent
    # 128 random bits, unique enough to find a request by; not a secret, so no system call
    # for them (the generator is reseeded in every forked process).
    return f"{random.getrandbits(128):032x}"


CORRELATION_ID_HEADER = "Correlation-Id"
_SANE_CORRELATION_ID = re.compile(r"[\x21-\x7e]{1,200}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def correlation_id(headers: Mapping[str, str], request_id: str | None) -> str | None:
    """The conversation a request belongs to: Correlation-Id as sent (1 to 200 visible ASCII
    characters), else the trace id of a W3C traceparent, else the request id."""
    sent = headers.get(CORRELATION_ID_HEADER)
    if sent is not None and _SANE_CORRELATION_ID.fullmatch(sent.strip()):
        return sent.strip()
    trace = _TRACEPARENT.fullmatch((headers.get("traceparent") or "").strip())
    if trace is not None and trace.group(1) != "0" * 32:
        return str(trace.group(1))
    return request_id


class RequestLogMiddleware:
    """Give each request an id, echo it on the response and, when it is done, log its line and
    count it in the metrics (``finish_request``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        # For the 500 handler, which answers from outside this middleware.
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before starting a response

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            finish_request(scope, rid, status, time.perf_counter() - started)


def finish_request(scope: Scope, rid: str, status: int, seconds: float) -> None:
    """What every answered request leaves behind: its count and latency in the metrics, and
    its log line."""
    count_request(scope, status, seconds)
    log_request(scope, rid, status, seconds * 1000)


def log_request(scope: Scope, rid: str, status: int, latency_ms: float) -> None:
    """Log the request's one line: its id, route template, status, latency and key."""
    level = logging.ERROR if status >= 500 else logging.INFO
    if not request_log.isEnabledFor(level):
        return
    principal = scope.get("state", {}).get("principal")
    client = scope.get("client")
    fields: dict[str, Any] = {
        "request_id": rid,
        "correlation_id": correlation_id(Headers(scope=scope), rid),
        "method": scope["method"],
        "route": route_template(scope),
        "path": scope["path"],
        "status": status,
        "latency_ms": round(latency_ms, 3),
        "client": client[0] if client else None,
    }
    if principal is not None:
        fields["key_id"] = principal.key_id
    request_log.log(
        level,
        "%s %s %s %.1fms",
        fields["method"],
        fields["path"],
        status,
        latency_ms,
        extra=fields,
    )
