"""Who may call what: bearer API keys, checked on every route group by the role it needs.

Each router is included with one ``Access``: the role its reads (GET, HEAD) need and the role
its other methods need. A missing, malformed, unknown or revoked key is a 401 with a Bearer
challenge; a key whose role is too low is a 403. There is no "auth off": with no key in the
store every guarded route answers 401 (``orderledger keys bootstrap`` issues the first key).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.concurrency import run_in_threadpool

from api.bootstrap import open_key_store
from api.http.problems import problem_responses
from api.http.state import Held
from api.key_store import ApiKeyStore, Principal, Role
from api.settings import Settings

__all__ = [
    "ADMIN",
    "AUDIT",
    "LEDGER",
    "OPEN",
    "OPERATIONS",
    "PERSONAL",
    "Access",
    "KeyStoreDep",
    "Principal",
    "Role",
    "keys_resource",
    "metrics_guard",
    "require",
]

CHALLENGE = 'Bearer realm="orderledger"'
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ApiKeyScheme(HTTPBearer):
    """The API key scheme as OpenAPI documents it: a bearer token read from Authorization."""

    def __init__(self) -> None:
        super().__init__(
            auto_error=False,
            scheme_name="ApiKey",
            bearerFormat="olk_<key_id>_<secret>",
            description="An API key from `orderledger keys create --role "
            "reader|writer|auditor|admin`, sent as `Authorization: Bearer <key>`.",
        )


bearer = ApiKeyScheme()
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


def bearer_token(authorization: str | None) -> str | None:
    """The API key in an Authorization header, read as ``bearer`` (HTTPBearer) reads it."""
    scheme, credentials = get_authorization_scheme_param(authorization)
    return credentials if scheme.lower() == "bearer" and credentials else None


@dataclass(frozen=True)
class Access:
    """The role a group of routes needs: ``read`` for GET/HEAD, ``write`` otherwise.

    None for both means open: no key is asked for.
    """

    read: Role | None
    write: Role | None

    @property
    def open(self) -> bool:
        return self.read is None and self.write is None

    def role_for(self, method: str) -> Role | None:
        return self.read if method.upper() in _READ_METHODS else self.write

    def include_options(self, router: APIRouter) -> dict[str, Any]:
        """Keyword arguments for include_router: the guard and its documented problems.

        Every guarded operation may answer 401. Only those needing more than the reader role
        may answer 403 (every key is at least a reader): that is documented on each of those
        routes, so a reader's operations do not list a refusal that cannot happen.
        """
        if self.open:
            return {}
        refusal = problem_responses(403)
        for route in router.routes:
            if isinstance(route, APIRoute):
                needed = {self.role_for(method) for method in route.methods or ()}
                if needed - {None, Role.reader}:
                    route.responses = {**refusal, **route.responses}
        return {
            "dependencies": [Security(_Guard(self))],
            "responses": problem_responses(401),
        }


OPEN = Access(read=None, write=None)
LEDGER = Access(read=Role.reader, write=Role.writer)
"""Orders, customers, reports: readers query and audit, writers also send commands."""
OPERATIONS = Access(read=Role.reader, write=Role.admin)
"""Projections: readers see their status, only admins start rebuilds."""
ADMIN = Access(read=Role.auditor, write=Role.admin)
"""Webhooks, effects (dead letters, retries), keys: auditors see them, only admins act."""
PERSONAL = Access(read=Role.admin, write=Role.admin)
"""A customer's personal data: its export and its erasure."""
AUDIT = Access(read=Role.auditor, write=Role.auditor)
"""The audit log, its checkpoints and verify."""


def keys_resource(settings: Settings) -> Callable[[FastAPI], Any]:
    """Hold the key store on app.state for the app's lifetime."""

    @asynccontextmanager
    async def hold_keys(app: FastAPI) -> AsyncIterator[None]:
        store = open_key_store(settings)
        app.state.keys = store
        try:
            yield
        finally:
            store.close()

    return hold_keys


_key_store = Held[ApiKeyStore]("keys")
get_key_store = _key_store.of
"""The key store the app opened at start-up."""
KeyStoreDep = Annotated[ApiKeyStore, Depends(_key_store.dependency)]


def _unauthorized(detail: str, *, token_sent: bool) -> HTTPException:
    challenge = f'{CHALLENGE}, error="invalid_token"' if token_sent else CHALLENGE
    return HTTPException(401, detail=detail, headers={"WWW-Authenticate": challenge})


async def authenticate(
    request: Request, credentials: HTTPAuthorizationCredentials | None
) -> Principal:
    """The request's principal (also put on request.state.principal), or a 401."""
    if credentials is None:
        if "authorization" in request.headers:
            raise _unauthorized(
                "the Authorization header must read 'Bearer <API key>'", token_sent=True
            )
        raise _unauthorized(
            "this route needs an API key, sent as 'Authorization: Bearer <key>'",
            token_sent=False,
        )
    store = get_key_store(request)
    token = credentials.credentials
    principal = store.cached(token) or await run_in_threadpool(store.authenticate, token)
    if principal is None:
        raise _unauthorized("the API key is unknown or revoked", token_sent=True)
    request.state.principal = principal
    return principal


async def _check(
    request: Request, credentials: HTTPAuthorizationCredentials | None, role: Role
) -> Principal:
    principal = await authenticate(request, credentials)
    if not principal.role.includes(role):
        raise HTTPException(
            403,
            detail=f"{request.method} {request.url.path} needs the {role} role; "
            f"key {principal.key_id} ({principal.name}) is a {principal.role}",
        )
    return principal


def require(role: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting keys with ``role`` or a higher one."""

    async def required_role(request: Request, credentials: BearerCredentials) -> Principal:
        return await _check(request, credentials, role)

    return required_role


class _Guard(ApiKeyScheme):
    """A router's guard: the scheme's own dependency, checking the role the method needs.

    One dependency rather than a guard depending on the scheme: FastAPI resolves each
    dependency on every request (10-15 µs of CPU each here).
    """

    def __init__(self, access: Access) -> None:
        super().__init__()
        self.access = access

    async def __call__(self, request: Request) -> Principal | None:  # type: ignore[override]
        role = self.access.role_for(request.method)
        if role is None:
            return None
        return await _check(request, await super().__call__(request), role)


async def metrics_guard(request: Request, credentials: BearerCredentials) -> Principal | None:
    """/metrics: open when settings.metrics_public, else admin only."""
    settings = cast(Settings, request.app.state.settings)
    if settings.metrics_public:
        return None
    return await _check(request, credentials, Role.admin)
