"""Readiness: whether this process can serve requests, and nothing more.

Ready while the event store and the read-model database answer. A failed or lagging projection
and a dead effect are the deployment's state, the same on every API machine: taking them all
out of rotation for one customer's refused email would help nobody. They are alerts instead,
in GET /projections, GET /effects, `orderledger status` and the metrics (docs/alerts.md).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.http.dependencies import LedgerDep
from api.http.read_models import ProjectionsDep
from api.http.schemas.reads import Readiness

log = logging.getLogger("orderledger.api")

router = APIRouter(tags=["health"])


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: a database does not answer"}},
)
def read_readiness(ledger: LedgerDep, runtime: ProjectionsDep) -> JSONResponse:
    """Ready when this process reaches its event store and its read models."""
    try:
        ledger.head_position()
        with runtime.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    # A probe must answer whatever breaks; the log says what did, the body only up or down.
    except Exception as error:
        log.warning("not ready: a database does not answer (%s)", type(error).__name__)
        return JSONResponse(Readiness(status="not_ready").model_dump(), status_code=503)
    return JSONResponse(Readiness(status="ready").model_dump())
