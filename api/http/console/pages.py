"""The console's pages and forms (see api/http/console/__init__.py)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode
from uuid import UUID

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from api.http.auth import get_key_store
from api.http.console.session import COOKIE, Session, Sessions
from api.http.read_models import get_projections, read_model
from api.http.routes.effects import get_effects
from api.http.routes.order_queries import STATUSES as ORDER_STATUSES
from api.http.routes.order_queries import order_listing
from api.http.routes.projections import current_statuses
from api.key_store import Principal, Role
from api.settings import Settings
from domain.errors import OrderNotFoundError
from domain.personal import parse_master_key
from projections.audit_log import NAME as AUDIT_LOG
from projections.audit_log import AuditFilters, list_audit_entries
from projections.effects.outbox import DEAD, STATUSES
from projections.effects.service import (
    EffectNotDeadError,
    EffectNotFoundError,
    Effects,
    status_totals,
)
from projections.engine.catalog import LAG_HISTORY_MINUTES, LagSample, NewerVersionError
from projections.engine.runtime import ProjectionRuntime, UnknownProjectionError
from projections.order_summaries import InvalidCursorError
from projections.verify import verify_store

HERE = Path(__file__).parent
STATIC = HERE / "static"
PAGE = 50

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)

router = APIRouter(prefix="/console", include_in_schema=False)


class RefusedError(Exception):
    """A console request that ends in a page saying why (401, 403, 404, ...)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


# -- sessions ---------------------------------------------------------------------------------


def _sessions(request: Request) -> Sessions:
    found: Sessions | None = getattr(request.app.state, "console_sessions", None)
    if found is None:
        settings: Settings = request.app.state.settings
        if settings.master_key is None:
            raise RefusedError(503, "the console needs ORDERLEDGER_MASTER_KEY to seal its sessions")
        master = parse_master_key(settings.master_key.get_secret_value())
        found = Sessions(master, settings.console_session_ttl)
        request.app.state.console_sessions = found
    return found


async def _signed_in(request: Request) -> tuple[Session, Principal] | None:
    session = _sessions(request).open(request.cookies.get(COOKIE))
    if session is None:
        return None
    store = get_key_store(request)
    principal = store.cached(session.token) or await run_in_threadpool(
        store.authenticate, session.token
    )
    return None if principal is None else (session, principal)


async def _form(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", errors="replace")
    return {key: values[0] for key, values in parse_qs(body).items()}


def _page(
    request: Request,
    template: str,
    *,
    signed_in: tuple[Session, Principal] | None = None,
    status_code: int = 200,
    **values: Any,
) -> HTMLResponse:
    session, principal = signed_in if signed_in is not None else (None, None)
    html = templates.get_template(template).render(
        request=request,
        principal=principal,
        csrf=session.csrf if session is not None else "",
        can=(lambda role: principal is not None and principal.role.includes(Role(role))),
        **values,
    )
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)


async def _require(request: Request, role: Role) -> tuple[Session, Principal]:
    """The signed-in session, with a key holding ``role``."""
    signed_in = await _signed_in(request)
    if signed_in is None:
        raise RefusedError(401, "sign in with an API key to see this page")
    if not signed_in[1].role.includes(role):
        raise RefusedError(403, f"this needs the {role} role; your key is a {signed_in[1].role}")
    return signed_in


async def _change(request: Request, role: Role) -> tuple[tuple[Session, Principal], dict[str, str]]:
    """A form that changes something: signed in with ``role`` and carrying the CSRF token."""
    signed_in = await _require(request, role)
    form = await _form(request)
    if not signed_in[0].csrf_matches(form.get("csrf")):
        raise RefusedError(403, "the form's CSRF token is missing or wrong: reload the page")
    return signed_in, form


async def refused_page(request: Request, error: RefusedError) -> Response:
    if error.status_code == 401:
        return _redirect("/console/sign-in")
    signed_in = await _signed_in(request) if error.status_code != 503 else None
    return _page(
        request,
        "refused.html",
        signed_in=signed_in,
        status_code=error.status_code,
        message=error.message,
    )


# -- signing in and out -----------------------------------------------------------------------


@router.get("")
async def home() -> Response:
    return _redirect("/console/orders")


@router.get("/sign-in")
async def sign_in_form(request: Request) -> Response:
    return _page(request, "sign_in.html", error=None)


@router.post("/sign-in")
async def sign_in(request: Request) -> Response:
    token = (await _form(request)).get("api_key", "").strip()
    store = get_key_store(request)
    principal = await run_in_threadpool(store.authenticate, token) if token else None
    if principal is None:
        return _page(
            request, "sign_in.html", status_code=401, error="That API key is unknown or revoked."
        )
    value, _ = _sessions(request).issue(token)
    response = _redirect("/console/orders")
    response.set_cookie(
        COOKIE,
        value,
        max_age=int(_sessions(request).ttl),
        path="/console",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/sign-out")
async def sign_out(request: Request) -> Response:
    await _change(request, Role.reader)
    response = _redirect("/console/sign-in")
    response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict")
    return response


# -- orders -------------------------------------------------------------------------------------


def _day(text: str | None, name: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise RefusedError(422, f"{name} must be a day like 2026-01-31, not {text!r}") from None


@router.get("/orders")
async def orders(request: Request) -> Response:
    signed_in = await _require(request, Role.reader)
    query = {k: v.strip() for k, v in request.query_params.items() if v.strip()}
    if "order_id" in query:
        try:
            return _redirect(f"/console/orders/{UUID(query['order_id'])}")
        except ValueError:
            raise RefusedError(422, f"not an order id: {query['order_id']!r}") from None
    status = query.get("status")
    if status is not None and status not in ORDER_STATUSES:
        raise RefusedError(422, f"unknown status {status!r}")
    placed_from, placed_to = _day(query.get("placed_from"), "from"), _day(query.get("to"), "to")
    listing = order_listing(
        query.get("customer_id"), status, placed_from, placed_to, PAGE, query.get("cursor")
    )
    try:
        page = await read_model(request, "order_summaries", listing, None)
    except InvalidCursorError as error:
        raise RefusedError(422, str(error)) from None
    next_url = None
    if page.next_cursor is not None:
        next_url = "/console/orders?" + urlencode({**query, "cursor": page.next_cursor})
    return _page(
        request,
        "orders.html",
        signed_in=signed_in,
        orders=page.items,
        query=query,
        statuses=ORDER_STATUSES,
        next_url=next_url,
    )


def _changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    return [
        (name, before.get(name), value)
        for name, value in after.items()
        if name not in ("version", "updated_at") and before.get(name) != value
    ]


@router.get("/orders/{order_id}")
async def order(request: Request, order_id: str) -> Response:
    signed_in = await _require(request, Role.reader)
    try:
        identifier = UUID(order_id)
    except ValueError:
        raise RefusedError(
            404, f"no order has the id {order_id!r}: an order id is a UUID"
        ) from None
    ledger = request.app.state.ledger

    def timeline() -> list[dict[str, Any]]:
        entries = ledger.order_history(identifier)
        steps: list[dict[str, Any]] = []
        before: dict[str, Any] = {}
        for entry in entries:
            state = ledger.order_as_of(identifier, version=entry.version).snapshot()
            steps.append({"entry": entry, "state": state, "changes": _changes(before, state)})
            before = state
        return steps

    try:
        steps = await run_in_threadpool(timeline)
    except OrderNotFoundError:
        raise RefusedError(404, f"order {identifier} not found") from None
    if not steps:
        raise RefusedError(404, f"order {identifier} not found")
    return _page(request, "order.html", signed_in=signed_in, order_id=identifier, steps=steps)


# -- projections ------------------------------------------------------------------------------


LAG_CHART_WIDTH = 120
LAG_CHART_HEIGHT = 24


@dataclass(frozen=True)
class LagChart:
    """A small line of a projection's lag in seconds over the last hour, newest at the right."""

    points: str
    last: tuple[float, float]
    top: float
    """The highest lag shown (the chart's full height), in seconds."""


def lag_chart(samples: Sequence[LagSample], now: float) -> LagChart | None:
    """The chart of a projection's samples, or None without any."""
    if not samples:
        return None
    first_minute = int(now // 60) - LAG_HISTORY_MINUTES + 1
    top = max(1.0, *(sample.lag_seconds for sample in samples))
    step = LAG_CHART_WIDTH / LAG_HISTORY_MINUTES

    def point(sample: LagSample) -> tuple[float, float]:
        x = (sample.minute - first_minute) * step + step / 2
        y = LAG_CHART_HEIGHT - 1 - (LAG_CHART_HEIGHT - 2) * sample.lag_seconds / top
        return round(x, 1), round(y, 1)

    points = [point(sample) for sample in samples]
    return LagChart(" ".join(f"{x},{y}" for x, y in points), points[-1], top)


def _projections_page(runtime: ProjectionRuntime, request: Request) -> dict[str, Any]:
    now = time.time()
    history = runtime.catalog.lag_history(now)
    return {
        "statuses": current_statuses(runtime, request),
        "charts": {name: lag_chart(samples, now) for name, samples in history.items()},
    }


@router.get("/projections")
async def projections(request: Request) -> Response:
    signed_in = await _require(request, Role.reader)
    shown = await run_in_threadpool(_projections_page, get_projections(request), request)
    return _page(request, "projections.html", signed_in=signed_in, **shown)


@router.post("/projections/{name}/rebuild")
async def rebuild(request: Request, name: str) -> Response:
    await _change(request, Role.admin)
    try:
        await run_in_threadpool(get_projections(request).start_rebuild, name)
    except UnknownProjectionError as error:
        raise RefusedError(404, str(error)) from None
    except NewerVersionError as error:
        raise RefusedError(409, str(error)) from None
    return _redirect("/console/projections")


# -- effects ----------------------------------------------------------------------------------


def _effects(request: Request) -> Effects:
    return get_effects(get_projections(request), request)


@router.get("/effects")
async def effects(request: Request) -> Response:
    signed_in = await _require(request, Role.auditor)
    status = request.query_params.get("status") or None
    if status is not None and status not in STATUSES:
        raise RefusedError(422, f"unknown status {status!r}")
    shown = await run_in_threadpool(_effects_page, _effects(request), status)
    return _page(
        request,
        "effects.html",
        signed_in=signed_in,
        status=status,
        statuses=STATUSES,
        moment=_moment,
        **shown,
    )


def _effects_page(service: Effects, status: str | None) -> dict[str, Any]:
    """What the effects page shows, read in one thread hand-off."""
    destinations = service.by_destination()
    return {
        "counts": status_totals(destinations),
        "effects": service.find(status=status, limit=100),
        "destinations": destinations,
        "dead_letters": service.dead_letters() if status == "dead" else [],
        "webhooks": service.subscription_views(include_inactive=True),
    }


@router.get("/effects/{effect_id}")
async def effect(request: Request, effect_id: str) -> Response:
    signed_in = await _require(request, Role.auditor)
    try:
        found = await run_in_threadpool(_effects(request).get, effect_id)
    except (EffectNotFoundError, ValueError):
        raise RefusedError(404, f"no effect has the id {effect_id!r}") from None
    return _page(request, "effect.html", signed_in=signed_in, effect=found, moment=_moment)


@router.post("/effects/{effect_id}/retry")
async def retry(request: Request, effect_id: str) -> Response:
    await _change(request, Role.admin)
    try:
        await run_in_threadpool(_effects(request).retry, effect_id)
    except (EffectNotFoundError, ValueError) as error:
        code = 409 if isinstance(error, EffectNotDeadError) else 404
        raise RefusedError(code, str(error)) from None
    return _redirect(f"/console/effects/{effect_id}")


@router.get("/effects-retry-dead")
async def confirm_retry_dead(request: Request) -> Response:
    """Ask first, saying how many dead effects (of one target, if given) go out again."""
    signed_in = await _require(request, Role.admin)
    target = request.query_params.get("target") or None
    found = await run_in_threadpool(_effects(request).by_destination)
    dead = sum(
        counts[DEAD] for destination, counts in found.items() if target in (None, destination)
    )
    return _page(request, "retry_dead.html", signed_in=signed_in, dead=dead, target=target)


@router.post("/effects-retry-dead")
async def retry_dead(request: Request) -> Response:
    _, form = await _change(request, Role.admin)
    target = form.get("target") or None
    await run_in_threadpool(partial(_effects(request).retry_all_dead, target=target))
    return _redirect("/console/effects?status=dead" if target else "/console/effects")


def _moment(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


# -- audit ------------------------------------------------------------------------------------

_AUDIT_FILTERS = ("actor", "order_id", "event_type", "correlation_id")


@router.get("/audit")
async def audit(request: Request) -> Response:
    signed_in = await _require(request, Role.auditor)
    query = {
        name: request.query_params[name].strip()
        for name in _AUDIT_FILTERS
        if request.query_params.get(name, "").strip()
    }
    filters = AuditFilters(
        actor=query.get("actor"),
        order_id=query.get("order_id"),
        event_type=query.get("event_type"),
        correlation_id=query.get("correlation_id"),
    )
    listing = partial(list_audit_entries, filters=filters, limit=PAGE)
    page = await read_model(request, AUDIT_LOG, listing, None)
    return _page(request, "audit.html", signed_in=signed_in, entries=page.items, query=query)


@router.post("/audit/verify")
async def verify(request: Request) -> Response:
    signed_in, _ = await _change(request, Role.auditor)
    report = await run_in_threadpool(verify_store, get_projections(request))
    return _page(request, "verify.html", signed_in=signed_in, report=asdict(report), ok=report.ok)
