"""Readiness: whether this instance should get traffic, with every check behind the answer.

Not ready while the store does not answer, a projection is failed, stalled or more than
``ready_max_lag_events`` behind, or an effect is dead: a dead effect needs an operator (fix the
receiver, then retry), so it keeps the instance visibly unhealthy until someone handles it.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.dependencies import LedgerDep
from api.projection_runtime import ProjectionsDep
from api.read_schemas import Readiness, ReadinessCheck
from api.settings import Settings
from domain.ledger import OrderLedger
from projections.effects.outbox import DEAD, PENDING
from projections.effects.service import Effects
from projections.runtime import ProjectionRuntime
from projections.status import FAILED, STALLED, ProjectionStatus, all_statuses

router = APIRouter(tags=["health"])


def _store(ledger: OrderLedger) -> ReadinessCheck:
    return ReadinessCheck(status="ok", detail=f"answering at position {ledger.head_position()}")


def _projections(runtime: ProjectionRuntime, settings: Settings) -> ReadinessCheck:
    statuses = all_statuses(
        runtime.catalog, runtime.source, stalled_after=settings.projection_stalled_after
    )
    limit = settings.ready_max_lag_events
    verdicts = [_verdict(status, limit) for status in statuses]
    broken = [verdict for verdict, ok in verdicts if not ok]
    if broken:
        return ReadinessCheck(status="failing", detail="; ".join(broken))
    return ReadinessCheck(status="ok", detail="; ".join(verdict for verdict, _ in verdicts))


def _verdict(status: ProjectionStatus, max_lag_events: int) -> tuple[str, bool]:
    """One projection's line in the check, and whether it passes."""
    if status.state in (FAILED, STALLED):
        return f"{status.name} is {status.state}", False
    if status.lag_events > max_lag_events:
        return (
            f"{status.name} is {status.lag_events} events behind (more than {max_lag_events})",
            False,
        )
    return f"{status.name} {status.state}, {status.lag_events} events behind", True


def _effects(runtime: ProjectionRuntime) -> ReadinessCheck:
    counts = Effects(runtime.engine, runtime.source).counts()
    summary = f"{counts[PENDING]} pending, {counts[DEAD]} dead"
    if counts[DEAD]:
        return ReadinessCheck(
            status="failing",
            detail=f"{summary}; fix the receivers, then retry the dead effects",
        )
    return ReadinessCheck(status="ok", detail=summary)


def _checked(check: Callable[[], ReadinessCheck]) -> ReadinessCheck:
    # A probe must answer whatever breaks; the failure's type is enough to start looking.
    try:
        return check()
    except Exception as error:
        return ReadinessCheck(status="failing", detail=f"not answering ({type(error).__name__})")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready; the failing checks say why"}},
)
def read_readiness(ledger: LedgerDep, runtime: ProjectionsDep, request: Request) -> JSONResponse:
    """Ready when the store answers, each projection is neither failed, stalled nor far behind,
    and no effect is dead; the body names each check and each projection."""
    settings = request.app.state.settings
    checks = {
        "store": _checked(lambda: _store(ledger)),
        "projections": _checked(lambda: _projections(runtime, settings)),
        "effects": _checked(lambda: _effects(runtime)),
    }
    ready = all(check.status == "ok" for check in checks.values())
    body = Readiness(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)
