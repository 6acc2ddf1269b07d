"""Prometheus metrics for scrapers: admin only unless settings.metrics_public."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.http.auth import metrics_guard
from api.http.problems import problem_responses
from api.metrics import StoreCollector, exposition

router = APIRouter(tags=["operations"], dependencies=[Depends(metrics_guard)])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
        },
        **problem_responses(401, 403),
    },
)
def read_metrics(request: Request) -> Response:
    """Commands, HTTP requests, projection progress and effects in Prometheus text format."""
    store: StoreCollector = request.app.state.store_metrics
    return Response(exposition(store), media_type=CONTENT_TYPE_LATEST)
