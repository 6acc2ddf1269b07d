"""Liveness: the service answers and can read its event store."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from api.http.dependencies import LedgerDep
from api.http.problems import problem_responses
from api.http.schemas.commands import Health

router = APIRouter(tags=["health"], responses=problem_responses(503))


@router.get("/healthz")
def read_health(ledger: LedgerDep) -> Health:
    """Report that the service is up and its event store answers."""
    try:
        ledger.head_position()
    # Any failure of the store means "not healthy"; the probe must answer, not crash.
    except Exception as error:
        raise HTTPException(503, detail="the event store is not answering") from error
    return Health(status="ok")
