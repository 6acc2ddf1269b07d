"""Webhook subscriptions: add one (its secret is shown once), list them, remove one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.exceptions import RequestValidationError

from api.http.dependencies import JSON_BODY
from api.http.idempotency import IdempotentRoute, replay_instead
from api.http.problems import problem_response, problem_responses
from api.http.routes.effects import EffectsDep
from api.http.schemas.reads import WebhookCreate, WebhookCreated, WebhookPublic, WebhooksPublic
from projections.effects.service import (
    InvalidSubscriptionError,
    SubscriptionView,
)

router = APIRouter(
    prefix="/webhooks",
    tags=["webhooks"],
    dependencies=[JSON_BODY],
    route_class=IdempotentRoute,
)

SubscriptionId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]


def _public(view: SubscriptionView) -> WebhookPublic:
    return WebhookPublic.model_validate(view, from_attributes=True)


@router.post("", status_code=201, responses=problem_responses(409, 413, 415, 422))
def create_webhook(body: WebhookCreate, effects: EffectsDep, request: Request) -> WebhookCreated:
    """Subscribe a URL to event types; the signing secret is in this response and no other.

    With an Idempotency-Key, a retry subscribes nothing again: since the secret is not kept
    with the stored answer, the retry gets a 409 problem naming the subscription.
    """
    try:
        created = effects.add_subscription(body.url, body.event_types)
    except InvalidSubscriptionError as error:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body",), "msg": str(error), "input": None}]
        ) from None
    view = effects.subscription_view(created.subscription.id)
    replay_instead(
        request,
        problem_response(
            request,
            status=409,
            slug="webhook-already-created",
            title="Webhook already created",
            detail=f"this Idempotency-Key already created subscription {view.id}; its secret "
            "was shown once: if it was lost, remove the subscription and add another",
        ),
    )
    return WebhookCreated(**_public(view).model_dump(), secret=created.secret)


@router.get("")
def read_webhooks(effects: EffectsDep) -> WebhooksPublic:
    """The active subscriptions, oldest first, without their secrets."""
    return WebhooksPublic(data=[_public(view) for view in effects.subscription_views()])


@router.delete("/{subscription_id}", status_code=204, responses=problem_responses(404, 422))
def delete_webhook(subscription_id: SubscriptionId, effects: EffectsDep) -> Response:
    """Stop recording deliveries for a subscription; those already recorded still go out."""
    effects.remove_subscription(subscription_id)
    return Response(status_code=204)
