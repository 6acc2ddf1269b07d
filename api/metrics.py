"""Prometheus metrics: commands, HTTP requests, projections and effects.

Counters and histograms are created once, at import, in prometheus-client's default registry,
so any number of apps in one process share them without duplicate registrations. Projection
and effect numbers are read from the store at scrape time (cached for a second), so they are
right whichever process runs the workers. Under ``serve --workers N`` every process writes its
counters to ``PROMETHEUS_MULTIPROC_DIR`` and a scrape sums them all.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import Scope

from api.settings import Settings
from domain.ledger import OrderLedger
from projections.effects.service import Effects
from projections.engine.runtime import ProjectionRuntime
from projections.engine.status import (
    CATCHING_UP,
    FAILED,
    LIVE,
    NOT_STARTED,
    REBUILDING,
    REFUSED,
    STALLED,
    all_statuses,
)

log = logging.getLogger("orderledger.metrics")

MULTIPROCESS_DIR_VAR = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED_ROUTE = "unmatched"
"""The one route label of every request no route matched, so raw paths never become labels."""
OTHER_METHOD = "other"
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
PROJECTION_STATES = (LIVE, CATCHING_UP, REBUILDING, STALLED, FAILED, NOT_STARTED, REFUSED)
SCRAPE_CACHE_SECONDS = 1.0

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

COMMANDS = Counter(
    "orderledger_commands",
    "Commands by type and outcome (ok, replayed, conflict, rejected, not_found, error)",
    ["command", "outcome"],
)
COMMAND_SECONDS = Histogram(
    "orderledger_command_duration_seconds",
    "Time a command took in the ledger, by type",
    ["command"],
    buckets=_LATENCY_BUCKETS,
)
HTTP_REQUESTS = Counter(
    "orderledger_http_requests",
    "HTTP requests by route template, method and status",
    ["route", "method", "status"],
)
HTTP_SECONDS = Histogram(
    "orderledger_http_request_duration_seconds",
    "Time from request to the end of the response, by route template and method",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS,
)


# -- commands ------------------------------------------------------------------------------------


def observe_command(command: str, outcome: str, seconds: float) -> None:
    """Count one finished command (a ledger command observer)."""
    COMMANDS.labels(command, outcome).inc()
    COMMAND_SECONDS.labels(command).observe(seconds)


def count_commands(ledger: OrderLedger) -> None:
    """Count the ledger's commands, once however many apps share it."""
    if observe_command not in ledger.command_observers:
        ledger.command_observers.append(observe_command)


# -- HTTP ------------------------------------------------------------------------------------------


def route_template(scope: Scope) -> str:
    """The matched route's path template (e.g. /orders/{order_id}), or one label for no match."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


def count_request(scope: Scope, status: int, seconds: float) -> None:
    """Count one answered request and its latency, labelled by route template and method."""
    count, timing = _http_series(route_template(scope), scope["method"], status)
    count.inc()
    timing.observe(seconds)


_Series = tuple[Counter, Histogram]
_http_series_cache: dict[tuple[str, str, int], _Series] = {}


def _http_series(route: str, method: str, status: int) -> _Series:
    """The request counter and latency histogram of one route, method and status.

    Looked up once per label set and kept: ``labels()`` validates and locks on every call,
    which an API answering thousands of requests a second need not pay each time. Route
    labels are templates, methods the standard few and statuses a few dozen, so the cache
    stays small.
    """
    series = _http_series_cache.get((route, method, status))
    if series is None:
        # A client may send any method name; only the standard ones become labels.
        label = method if method in _KNOWN_METHODS else OTHER_METHOD
        series = (
            HTTP_REQUESTS.labels(route, label, str(status)),
            HTTP_SECONDS.labels(route, label),
        )
        if method in _KNOWN_METHODS:
            _http_series_cache[(route, method, status)] = series
    return series


# -- projections and effects, read at scrape time -----------------------------------------------


class StoreCollector(Collector):
    """Projection progress and outbox counts, read from the catalog and the outbox on scrape.

    A scrape is cached for a second, so several scrapers (or a fast one) cost one read.
    """

    def __init__(self, runtime: ProjectionRuntime, stalled_after: float) -> None:
        self.runtime = runtime
        self.stalled_after = stalled_after
        self._lock = threading.Lock()
        self._cached: list[Metric] = []
        self._read_at = float("-inf")

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if time.monotonic() - self._read_at > SCRAPE_CACHE_SECONDS:
                self._cached = self._read()
                self._read_at = time.monotonic()
            return list(self._cached)

    def _read(self) -> list[Metric]:
        up = GaugeMetricFamily(
            "orderledger_store_up", "1 when the last scrape could read the store, else 0"
        )
        # A scrape must answer whatever breaks; the gauge at 0 tells the operator to look.
        try:
            families = self._projections() + self._effects()
        except Exception:
            log.warning("metrics: the store could not be read", exc_info=True)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, *families]

    def _projections(self) -> list[Metric]:
        def gauge(name: str, documentation: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(
                f"orderledger_projection_{name}", documentation, labels=["projection"]
            )

        position = gauge("position", "Global position the serving read model has applied")
        head = gauge("head", "Global position of the newest event in the store")
        lag_events = gauge("lag_events", "Events recorded and not yet applied")
        lag_seconds = gauge("lag_seconds", "Age of the oldest event not yet applied")
        rebuild_position = gauge("rebuild_position", "Position a rebuild in progress has reached")
        rebuild_head = gauge("rebuild_head", "Head a rebuild in progress is building towards")
        state = GaugeMetricFamily(
            "orderledger_projection_state",
            "1 for the projection's current state, 0 for the others",
            labels=["projection", "state"],
        )
        statuses = all_statuses(
            self.runtime.catalog, self.runtime.source, stalled_after=self.stalled_after
        )
        oldest = GaugeMetricFamily(
            "orderledger_oldest_transaction_seconds",
            "Age of the oldest transaction still running (PostgreSQL): projections wait for it",
        )
        oldest.add_metric([], statuses[0].oldest_transaction_seconds if statuses else 0.0)
        for status in statuses:
            name = [status.name]
            position.add_metric(name, status.position)
            head.add_metric(name, status.head)
            lag_events.add_metric(name, status.lag_events)
            lag_seconds.add_metric(name, status.lag_seconds)
            for each in PROJECTION_STATES:
                state.add_metric([status.name, each], 1 if status.state == each else 0)
            if status.rebuild is not None:
                rebuild_position.add_metric(name, status.rebuild.position)
                rebuild_head.add_metric(name, status.rebuild.head)
        return [
            position,
            head,
            lag_events,
            lag_seconds,
            state,
            rebuild_position,
            rebuild_head,
            oldest,
        ]

    def _effects(self) -> list[Metric]:
        outbox = GaugeMetricFamily(
            "orderledger_outbox_effects", "Effects in the outbox by status", labels=["status"]
        )
        for status, count in Effects(self.runtime.engine, self.runtime.source).counts().items():
            outbox.add_metric([status], count)
        return [outbox]


def multiprocess_dir() -> str | None:
    """Where every process's counters live when several API processes serve together."""
    return os.environ.get(MULTIPROCESS_DIR_VAR) or None


def exposition(store: StoreCollector) -> bytes:
    """The Prometheus text for this process (or all of them) and for the store."""
    if multiprocess_dir() is None:
        counters = generate_latest(REGISTRY)
    else:
        every_process = CollectorRegistry()
        # prometheus-client leaves these two untyped.
        multiprocess.MultiProcessCollector(every_process)  # type: ignore[no-untyped-call]
        counters = generate_latest(every_process)
    store_registry = CollectorRegistry()
    store_registry.register(store)
    return counters + generate_latest(store_registry)


def metrics_resource(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Count the app's commands and read its store on scrape, for the app's lifetime."""

    @asynccontextmanager
    async def hold_metrics(app: FastAPI) -> AsyncIterator[None]:
        count_commands(app.state.ledger)
        app.state.store_metrics = StoreCollector(
            app.state.projections, settings.projection_stalled_after
        )
        try:
            yield
        finally:
            if multiprocess_dir() is not None:
                # This process's live gauges leave the aggregate; its counters still count.
                multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    return hold_metrics


class _ProcessAndStore(Collector):
    """This process's counters (the default registry) followed by the store's gauges."""

    def __init__(self, store: StoreCollector) -> None:
        self.store = store

    def collect(self) -> Iterable[Metric]:
        yield from REGISTRY.collect()
        yield from self.store.collect()


def serve_worker_metrics(
    runtime: ProjectionRuntime, settings: Settings, host: str, port: int
) -> tuple[str, int]:
    """Serve a worker process's metrics at http://host:port/metrics (its own thread).

    The worker has no API, so this plain endpoint, with no key, is the only way to scrape its
    dispatcher's delivery counters; bind it to an address only the scraper reaches. Returns the
    bound address (port 0 picks a free one).
    """
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_ProcessAndStore(StoreCollector(runtime, settings.projection_stalled_after)))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound_host, bound_port = server.server_address[:2]
    return str(bound_host), int(bound_port)
