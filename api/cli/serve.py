"""orderledger serve: the HTTP API under uvicorn, in one process or several."""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import SecretStr

from api.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

from api.cli import operate
from api.cli.common import DatabaseUrlOption, open_ledger_or_fail, reported_errors, settings_from

_SERVE_PID_VAR = "ORDERLEDGER_SERVE_PID"
"""Set by ``serve --workers N`` for its children, which exit when that process is gone."""
_PARENT_POLL_SECONDS = 1.0


# -- serve ------------------------------------------------------------------------------------


def serve(
    host: Annotated[
        str | None, typer.Option(help="Interface to bind (default ORDERLEDGER_HOST or 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to bind (default ORDERLEDGER_PORT or 8000).")
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            max=64,
            help="API processes. With more than one, projections and effects run once, in one "
            "worker process beside them.",
        ),
    ] = 1,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Serve the HTTP API."""
    settings = settings_from(database_url, host=host, port=port)
    with reported_errors():
        if workers == 1:
            run_server(settings)
        else:
            run_workers(settings, workers)


def run_server(settings: Settings) -> None:
    """Run the API under uvicorn until interrupted, projections and effects in the same process."""
    # The HTTP stack loads only when serving, so the other commands start quickly.
    import uvicorn  # noqa: PLC0415

    from api.http.app import create_app  # noqa: PLC0415

    # Opened here rather than in the app's start-up so a bad store is one clear line, not a
    # failed lifespan with a traceback.
    ledger = open_ledger_or_fail(settings)
    try:
        _exit_normally_after_shutdown()
        uvicorn.run(create_app(settings, ledger=ledger), **_uvicorn_options(settings))
    finally:
        ledger.close()


def _uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How uvicorn serves the API, in one process or several: our log format, no access log
    (the request log replaces it), our HTTP protocol."""
    from api.http.transport import CoalescingHttpToolsProtocol  # noqa: PLC0415
    from api.logs import logging_config  # noqa: PLC0415

    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "log_config": logging_config(settings.log_format, settings.log_level),
        "access_log": False,
        "http": CoalescingHttpToolsProtocol,
    }


def run_workers(settings: Settings, workers: int) -> None:
    """Run ``workers`` API processes, and projections and effects once, in a worker process.

    The API processes read their settings from the environment set here and share their
    counters through a fresh PROMETHEUS_MULTIPROC_DIR; every child exits with this process.
    """
    import uvicorn  # noqa: PLC0415
    from uvicorn.supervisors import Multiprocess  # noqa: PLC0415

    from api.metrics import MULTIPROCESS_DIR_VAR  # noqa: PLC0415

    open_ledger_or_fail(settings).close()  # a bad store is one clear line before any process starts
    metrics_dir = tempfile.mkdtemp(prefix="orderledger-metrics-")
    os.environ.update(_environment(settings.model_copy(update={"run_projections": False})))
    os.environ[MULTIPROCESS_DIR_VAR] = metrics_dir
    os.environ[_SERVE_PID_VAR] = str(os.getpid())
    projection_worker = _start_projection_worker() if settings.run_projections else None
    config = uvicorn.Config(
        "api.cli.serve:serve_app", factory=True, workers=workers, **_uvicorn_options(settings)
    )
    try:
        # What uvicorn.run does for workers > 1, with the shared socket labelled TCP.
        Multiprocess(config, sockets=[labelled_tcp(config.bind_socket())]).run()
    except KeyboardInterrupt:
        pass
    finally:
        if projection_worker is not None:
            _stop_process(projection_worker)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def labelled_tcp(listener: socket.socket) -> socket.socket:
    """The listening socket with its protocol set to TCP, so accepted connections get TCP_NODELAY.

    uvicorn creates the socket it shares between worker processes with protocol 0, and asyncio
    sets TCP_NODELAY only on sockets whose protocol says TCP: without it every response on a
    kept-alive connection waits for the client's delayed ACK, about 40 ms (uvicorn issue 3149).
    """
    if listener.family not in (socket.AF_INET, socket.AF_INET6):
        return listener
    return socket.socket(
        listener.family, listener.type, socket.IPPROTO_TCP, fileno=listener.detach()
    )


def serve_app() -> FastAPI:
    """The app of one ``serve --workers N`` process, configured by the environment serve set."""
    from api.http.app import create_app  # noqa: PLC0415

    _exit_with_parent(int(os.environ[_SERVE_PID_VAR]))
    return create_app(Settings())


def _environment(settings: Settings) -> dict[str, str]:
    """The settings as ORDERLEDGER_* variables, so every process serve starts configures alike."""
    variables = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
        elif isinstance(value, bool):
            text = str(value).lower()
        else:
            text = str(value)
        variables[f"ORDERLEDGER_{name.upper()}"] = text
    return variables


def _start_projection_worker() -> multiprocessing.process.BaseProcess:
    """``orderledger worker`` in a child process: the deployment's one projection worker."""
    process = multiprocessing.get_context("spawn").Process(
        target=_projection_worker, args=(os.getpid(),), name="orderledger-worker"
    )
    process.start()
    return process


def _projection_worker(parent: int) -> None:
    _exit_with_parent(parent)
    operate.worker()


def _stop_process(process: multiprocessing.process.BaseProcess, timeout: float = 15.0) -> None:
    """SIGTERM the process and wait for it to finish its batch; SIGKILL it if it hangs."""
    process.terminate()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()


def _exit_normally_after_shutdown() -> None:
    """Let SIGINT and SIGTERM end serve with exit code 0 once uvicorn has shut down.

    uvicorn handles the signal (a graceful shutdown), restores the handlers it found and raises
    the signal again; with the default handlers the process would then die by the signal,
    skipping the ledger's close. These handlers do nothing, so uvicorn.run simply returns.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)


def _exit_with_parent(parent: int) -> None:
    """SIGTERM this process once ``parent`` is gone, so a SIGKILLed serve leaves no orphans."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orderledger-parent-watch", daemon=True).start()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
