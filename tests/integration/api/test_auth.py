"""The auth matrix: every route the app serves x every kind of caller gives the documented answer.

The table below is the contract (the README's API section shows the same). A route the app
serves without a row here fails the test, so no route is ever added without a decision.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.routing import iter_route_contexts
from starlette.exceptions import StarletteDeprecationWarning

from api.http.app import create_app
from api.http.auth import require
from api.key_store import DEFAULT_CACHE_TTL, ApiKeyStore, Role
from api.settings import Settings
from tests.support.auth import bearer, issue_key
from tests.support.http import assert_problem

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

OPEN = None
READER, WRITER, AUDITOR, ADMIN = Role.reader, Role.writer, Role.auditor, Role.admin

ROUTE_ROLES: dict[tuple[str, str], Role | None] = {
    ("GET", "/openapi.json"): OPEN,
    ("GET", "/docs"): OPEN,
    ("GET", "/docs/oauth2-redirect"): OPEN,
    ("GET", "/redoc"): OPEN,
    ("GET", "/healthz"): OPEN,
    ("GET", "/readyz"): OPEN,
    ("POST", "/orders"): WRITER,
    ("POST", "/orders/{order_id}/lines"): WRITER,
    ("DELETE", "/orders/{order_id}/lines/{sku}"): WRITER,
    ("POST", "/orders/{order_id}/payments"): WRITER,
    ("POST", "/orders/{order_id}/shipment"): WRITER,
    ("POST", "/orders/{order_id}/delivery"): WRITER,
    ("POST", "/orders/{order_id}/cancellation"): WRITER,
    ("POST", "/orders/{order_id}/refunds"): WRITER,
    ("GET", "/orders/{order_id}/history"): READER,
    ("GET", "/orders/{order_id}/state"): READER,
    ("GET", "/orders"): READER,
    ("GET", "/orders/{order_id}"): READER,
    ("GET", "/customers/{customer_id}"): READER,
    ("GET", "/customers/{customer_id}/personal-data"): ADMIN,
    ("DELETE", "/customers/{customer_id}/personal-data"): ADMIN,
    ("GET", "/reports/daily-sales"): READER,
    ("GET", "/reports/top-skus"): READER,
    ("GET", "/projections"): READER,
    ("GET", "/projections/{name}"): READER,
    ("POST", "/projections/{name}/rebuild"): ADMIN,
    ("POST", "/webhooks"): ADMIN,
    ("GET", "/webhooks"): AUDITOR,
    ("DELETE", "/webhooks/{subscription_id}"): ADMIN,
    ("GET", "/effects"): AUDITOR,
    ("GET", "/effects/{effect_id}"): AUDITOR,
    ("POST", "/effects/{effect_id}/retry"): ADMIN,
    ("POST", "/keys"): ADMIN,
    ("GET", "/keys"): AUDITOR,
    ("DELETE", "/keys/{key_id}"): ADMIN,
    ("GET", "/audit"): AUDITOR,
    ("GET", "/audit/checkpoints"): AUDITOR,
    ("POST", "/audit/checkpoints"): AUDITOR,
    ("POST", "/audit/verify"): AUDITOR,
    ("GET", "/metrics"): ADMIN,
}

SAMPLE_PATH_PARAMETERS = {
    "order_id": "0b4a5f8e-6f2d-4c1e-9a57-3d2f1e0c9b8a",
    "sku": "SKU-1",
    "customer_id": "cust-42",
    "name": "order_summaries",
    "subscription_id": "5d0e6c1a-2b3f-4a59-8e7d-6c5b4a392817",
    "effect_id": "7e1f2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b",
    "key_id": "0123456789abcdef",
}

CALLERS = ("no key", "bad key", "revoked key", "reader", "writer", "auditor", "admin")
CHALLENGE = 'Bearer realm="orderledger"'
INVALID_TOKEN_CHALLENGE = 'Bearer realm="orderledger", error="invalid_token"'


def served_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, HEAD and the console aside (its pages
    sign in with a cookie: tests/integration/console covers their roles)."""
    return sorted(
        (method, route.path_format or "")
        for route in iter_route_contexts(app.routes)
        for method in route.methods or ()
        if method != "HEAD" and not (route.path_format or "").startswith("/console")
    )


def _settings(database_url: str, **overrides: Any) -> Settings:
    """Settings that ignore the environment's metrics_public and run no worker."""
    values: dict[str, Any] = {"metrics_public": False, "run_projections": False, **overrides}
    return Settings(database_url=database_url, **values)


ROUTES = served_routes(create_app(_settings("sqlite:///never-opened.db")))


class Callers:
    """A started app and the Authorization header of each kind of caller."""

    def __init__(self, client: TestClient, headers: dict[str, dict[str, str]]) -> None:
        self.client = client
        self.headers = headers

    def send(self, method: str, path: str, caller: str) -> httpx.Response:
        url = path.format(**SAMPLE_PATH_PARAMETERS)
        body = {} if method == "POST" else None
        return self.client.request(method, url, json=body, headers=self.headers[caller])


@pytest.fixture(scope="module")
def callers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callers]:
    url = f"sqlite:///{tmp_path_factory.mktemp('auth')}/orderledger.db"
    store = ApiKeyStore.from_url(url)
    try:
        revoked = store.create(Role.admin, "revoked admin")
        store.revoke(revoked.key_id)
        good = store.create(Role.admin, "matrix admin").token
    finally:
        store.close()
    wrong_secret = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    headers = {
        "no key": {},
        "bad key": bearer(wrong_secret),
        "revoked key": bearer(revoked.token),
        "reader": bearer(issue_key(url, Role.reader)),
        "writer": bearer(issue_key(url, Role.writer)),
        "auditor": bearer(issue_key(url, Role.auditor)),
        "admin": bearer(good),
    }
    with TestClient(create_app(_settings(url, run_projections=True))) as client:
        wait_until_ready(client)
        yield Callers(client, headers)


def wait_until_ready(client: TestClient, patience: float = 60.0) -> None:
    """Until the worker has built every read model (reads would answer 503 before)."""
    deadline = time.monotonic() + patience
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").text
        time.sleep(0.05)


class TestTheMatrix:
    def test_every_route_the_app_serves_has_a_decision(self) -> None:
        """A new route must be added to ROUTE_ROLES (and the README) with the role it needs."""
        assert set(ROUTES) == set(ROUTE_ROLES), (
            f"undecided: {sorted(set(ROUTES) - set(ROUTE_ROLES))}; "
            f"gone: {sorted(set(ROUTE_ROLES) - set(ROUTES))}"
        )

    @pytest.mark.parametrize("caller", CALLERS)
    @pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
    def test_each_caller_gets_the_documented_answer(
        self, callers: Callers, method: str, path: str, caller: str
    ) -> None:
        needed = ROUTE_ROLES[(method, path)]
        response = callers.send(method, path, caller)
        assert response.status_code < 500, response.text
        if needed is None:
            assert response.status_code not in (401, 403), response.text
        elif caller == "no key":
            assert_problem(response, 401, "unauthorized")
            assert response.headers["WWW-Authenticate"] == CHALLENGE
        elif caller in ("bad key", "revoked key"):
            assert_problem(response, 401, "unauthorized")
            assert response.headers["WWW-Authenticate"] == INVALID_TOKEN_CHALLENGE
        elif Role(caller).includes(needed):
            assert response.status_code not in (401, 403), response.text
        else:
            problem = assert_problem(response, 403, "forbidden")
            assert f"needs the {needed} role" in problem["detail"]
            assert "WWW-Authenticate" not in response.headers


class TestChallenges:
    def test_with_no_key_in_the_store_every_guarded_route_is_closed(self, sqlite_url: str) -> None:
        """Nothing is open by default: a fresh store has no key, so no request gets through."""
        with TestClient(create_app(_settings(sqlite_url))) as client:
            assert client.get("/healthz").status_code == 200
            for method, path in ROUTES:
                if ROUTE_ROLES.get((method, path)) is None:
                    continue
                url = path.format(**SAMPLE_PATH_PARAMETERS)
                response = client.request(method, url, headers=bearer("olk_" + "0" * 16 + "_x"))
                assert response.status_code == 401, (method, path, response.text)

    @pytest.mark.parametrize(
        "authorization",
        ["Basic YWRtaW46YWRtaW4=", "Bearer", "Bearer ", "bearer not-a-key", "olk_abc"],
    )
    def test_an_unusable_authorization_header_is_an_invalid_token(
        self, client: TestClient, authorization: str
    ) -> None:
        response = client.get("/orders", headers={"Authorization": authorization})
        assert_problem(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == INVALID_TOKEN_CHALLENGE

    def test_the_scheme_name_is_case_insensitive(self, client: TestClient, api_key: Any) -> None:
        token = api_key(Role.reader)
        response = client.get("/orders", headers={"Authorization": f"bearer {token}"})
        assert response.status_code == 200, response.text


class TestRequire:
    def test_a_route_guarded_by_require_sees_the_principal(self, sqlite_url: str) -> None:
        """require(role) admits that role and above and leaves the principal on request.state."""
        app = create_app(_settings(sqlite_url))

        def whoami(request: Request) -> dict[str, str]:
            principal = request.state.principal
            return {"key_id": principal.key_id, "name": principal.name, "role": principal.role}

        app.add_api_route("/whoami", whoami, dependencies=[Depends(require(Role.writer))])
        store = ApiKeyStore.from_url(sqlite_url)
        try:
            writer = store.create(Role.writer, "robot")
            admin = store.create(Role.admin, "ops")
            reader = store.create(Role.reader, "dashboard")
        finally:
            store.close()
        with TestClient(app) as client:
            seen = client.get("/whoami", headers=bearer(writer.token)).json()
            assert seen == {"key_id": writer.key_id, "name": "robot", "role": "writer"}
            assert client.get("/whoami", headers=bearer(admin.token)).json()["role"] == "admin"
            assert_problem(client.get("/whoami", headers=bearer(reader.token)), 403)
            assert_problem(client.get("/whoami"), 401)


class TestMetricsSetting:
    def test_metrics_are_open_only_when_the_setting_says_so(self, sqlite_url: str) -> None:
        with TestClient(create_app(_settings(sqlite_url, metrics_public=True))) as client:
            assert client.get("/metrics").status_code == 200
        with TestClient(create_app(_settings(sqlite_url))) as client:
            assert_problem(client.get("/metrics"), 401)
            reader = issue_key(sqlite_url, Role.reader)
            assert_problem(client.get("/metrics", headers=bearer(reader)), 403)
            assert client.get("/metrics", headers=bearer(issue_key(sqlite_url))).status_code == 200


class TestOpenApi:
    def test_the_bearer_scheme_and_each_routes_problems_are_documented(
        self, client: TestClient
    ) -> None:
        """Guarded operations name the ApiKey scheme and their 401 problem; a 403 only where
        a reader's key can be refused."""
        document = client.get("/openapi.json").json()
        scheme = document["components"]["securitySchemes"]["ApiKey"]
        assert scheme["type"] == "http"
        assert scheme["scheme"] == "bearer"
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                needed = ROUTE_ROLES[(method.upper(), path)]
                responses = operation["responses"]
                where = f"{method.upper()} {path}"
                if needed is None:
                    assert "security" not in operation, where
                    assert "401" not in responses, where
                    continue
                assert operation["security"] == [{"ApiKey": []}], where
                assert "application/problem+json" in responses["401"]["content"], where
                # Every key is at least a reader: only a higher need can refuse one.
                assert ("403" in responses) == (needed is not Role.reader), where


class TestRevocationAcrossInstances:
    @pytest.mark.postgres
    def test_a_key_revoked_on_one_instance_is_refused_by_another_within_the_bound(
        self, postgres_url: str
    ) -> None:
        """Two API instances on one PostgreSQL database: B refuses the key DEFAULT_CACHE_TTL
        after A revoked it, though B had just accepted (and cached) it."""
        admin = bearer(issue_key(postgres_url, Role.admin))
        with (
            TestClient(create_app(_settings(postgres_url)), headers=admin) as first,
            TestClient(create_app(_settings(postgres_url)), headers=admin) as second,
        ):
            created = first.post("/keys", json={"role": "reader", "name": "laptop"})
            assert created.status_code == 201, created.text
            key = bearer(created.json()["token"])
            # Past authentication: the event store answers that no such order exists.
            history = f"/orders/{SAMPLE_PATH_PARAMETERS['order_id']}/history"
            assert_problem(second.get(history, headers=key), 404)
            assert first.delete(f"/keys/{created.json()['key_id']}").status_code == 204
            # The instance that revoked forgets the key at once; the other within the bound.
            assert_problem(first.get(history, headers=key), 401)
            time.sleep(DEFAULT_CACHE_TTL)
            assert_problem(second.get(history, headers=key), 401)
