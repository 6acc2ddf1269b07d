"""The console over HTTP: sessions, roles, CSRF, escaping and its security headers.

The browser's view of the same pages (scripts, CSP violations, layout) is in
tests/e2e/test_console_browser.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.http.app import create_app
from api.http.console.pages import CONTENT_SECURITY_POLICY
from api.http.console.session import COOKIE
from api.key_store import ApiKeyStore, Role
from api.settings import Settings
from tests import LOCAL_RECEIVERS
from tests.support.auth import bearer, issue_key
from tests.support.console import HOSTILE_SKU, QUOTED_CUSTOMER, csrf_of, sign_in
from tests.support.http import order_body
from tests.support.receivers import WebhookReceiver
from tests.support.waiting import wait_for

PAGES = ("/console/orders", "/console/projections")
AUDITOR_PAGES = ("/console/effects", "/console/audit", "/console/effects-retry-dead")


@pytest.fixture
def console(sqlite_url: str) -> Iterator[TestClient]:
    """The app on a fresh store, sending no API key (the console signs in with a cookie);
    keys are checked on every request (no key cache)."""
    with TestClient(create_app(Settings(database_url=sqlite_url, key_cache_ttl=0))) as client:
        yield client


def _url(client: TestClient) -> str:
    return str(client.app.state.settings.database_url)  # type: ignore[attr-defined]


def _place(client: TestClient, **overrides: object) -> str:
    token = issue_key(_url(client), Role.writer)
    placed = client.post("/orders", json=order_body(**overrides), headers=bearer(token))
    assert placed.status_code == 201, placed.text
    return str(placed.json()["order_id"])


class TestSessions:
    def test_without_a_session_every_page_sends_to_the_sign_in_form(
        self, console: TestClient
    ) -> None:
        for page in (*PAGES, *AUDITOR_PAGES, "/console/orders/" + "0" * 8):
            response = console.get(page, follow_redirects=False)
            assert (response.status_code, response.headers["location"]) == (
                303,
                "/console/sign-in",
            ), page

    def test_a_wrong_key_is_refused_and_gets_no_cookie(self, console: TestClient) -> None:
        refused = console.post("/console/sign-in", data={"api_key": "olk_nothing"})
        assert refused.status_code == 401
        assert "unknown or revoked" in refused.text
        assert COOKIE not in refused.cookies

    def test_the_cookie_is_http_only_strict_and_scoped_then_sign_out_clears_it(
        self, console: TestClient
    ) -> None:
        token = issue_key(_url(console), Role.reader)
        signed = console.post("/console/sign-in", data={"api_key": token}, follow_redirects=False)
        cookie = signed.headers["set-cookie"]
        for attribute in ("HttpOnly", "SameSite=strict", "Path=/console", "Max-Age=28800"):
            assert attribute in cookie
        assert token not in cookie  # sealed, not the key itself
        for page in PAGES:
            assert console.get(page).status_code == 200

        out = console.post(
            "/console/sign-out", data={"csrf": csrf_of(console)}, follow_redirects=False
        )
        assert out.status_code == 303
        assert console.get(PAGES[0], follow_redirects=False).status_code == 303

    def test_an_altered_cookie_or_a_revoked_key_ends_the_session(self, console: TestClient) -> None:
        token = sign_in(console, _url(console), Role.admin)
        sealed = console.cookies[COOKIE]
        console.cookies.set(COOKIE, sealed[:-6] + "AAAAAA", path="/console")
        assert console.get(PAGES[0], follow_redirects=False).status_code == 303
        console.cookies.set(COOKIE, sealed, path="/console")
        assert console.get(PAGES[0]).status_code == 200

        store = ApiKeyStore.from_url(_url(console))
        try:
            store.revoke(token.split("_")[1])
        finally:
            store.close()
        assert console.get(PAGES[0], follow_redirects=False).status_code == 303


class TestRolesAndForgery:
    def test_a_reader_sees_orders_and_projections_but_acts_on_nothing(
        self, console: TestClient
    ) -> None:
        sign_in(console, _url(console), Role.reader)
        page = console.get("/console/projections").text
        assert "Rebuild</button>" not in page
        for forbidden in AUDITOR_PAGES:
            refused = console.get(forbidden)
            assert refused.status_code == 403 and "needs the" in refused.text, forbidden
        refused = console.post(
            "/console/projections/order_summaries/rebuild", data={"csrf": csrf_of(console)}
        )
        assert refused.status_code == 403 and "needs the admin role" in refused.text

    def test_an_auditor_sees_effects_and_audit_and_may_verify_but_not_retry(
        self, console: TestClient
    ) -> None:
        sign_in(console, _url(console), Role.auditor)
        for page in ("/console/effects", "/console/audit"):
            assert console.get(page).status_code == 200
        verified = console.post("/console/audit/verify", data={"csrf": csrf_of(console)})
        assert verified.status_code == 200 and "Every check holds." in verified.text
        assert console.get("/console/effects-retry-dead").status_code == 403

    def test_a_change_without_the_sessions_csrf_token_is_refused(self, console: TestClient) -> None:
        sign_in(console, _url(console), Role.admin)
        runtime = console.app.state.projections  # type: ignore[attr-defined]
        for data in ({}, {"csrf": "forged"}):
            refused = console.post("/console/projections/order_summaries/rebuild", data=data)
            assert refused.status_code == 403 and "CSRF" in refused.text
        assert [r.role for r in runtime.catalog.rows("order_summaries")].count("building") == 0

        started = console.post(
            "/console/projections/order_summaries/rebuild",
            data={"csrf": csrf_of(console)},
            follow_redirects=False,
        )
        assert started.status_code == 303
        wait_for(
            lambda: max(r.generation for r in runtime.catalog.rows("order_summaries")) == 2,
            "the rebuild to start",
        )


class TestPages:
    def test_every_page_is_sent_with_a_strict_policy_and_no_inline_script_or_style(
        self, console: TestClient
    ) -> None:
        order_id = _place(console)
        sign_in(console, _url(console), Role.admin)
        for page in (*PAGES, *AUDITOR_PAGES, f"/console/orders/{order_id}", "/console/sign-in"):
            response = console.get(page)
            assert response.status_code == 200, page
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert response.headers["x-frame-options"] == "DENY"
            assert "<style" not in response.text and "style=" not in response.text
            assert "<script>" not in response.text  # only <script src=...> from /static

    def test_hostile_values_are_escaped_everywhere_they_are_shown(
        self, console: TestClient
    ) -> None:
        lines = [{"sku": HOSTILE_SKU, "quantity": 1, "unit_price": 100}]
        order_id = _place(console, customer_id=QUOTED_CUSTOMER, lines=lines)
        sign_in(console, _url(console), Role.admin)
        wait_for(lambda: order_id in console.get("/console/orders").text, "the order to be listed")
        pages = [
            console.get(f"/console/orders/{order_id}").text,
            console.get("/console/orders", params={"customer_id": QUOTED_CUSTOMER}).text,
        ]
        for page in pages:
            assert HOSTILE_SKU not in page and QUOTED_CUSTOMER not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[0]
        assert "cust-&#34;o&#39;brien&#34;" in pages[1]

        odd = console.get('/console/orders/<img src=x onerror="alert(1)">')
        assert odd.status_code == 404
        assert "<img" not in odd.text and "&lt;img src=x" in odd.text

    def test_the_timeline_shows_who_did_each_step_and_what_changed(
        self, console: TestClient
    ) -> None:
        order_id = _place(console)
        token = issue_key(_url(console), Role.writer, "till 7")
        paid = console.post(
            f"/orders/{order_id}/payments",
            json={"amount": 3000, "payment_reference": "psp-1"},
            headers={**bearer(token), "Correlation-Id": "checkout-42"},
        )
        assert paid.status_code == 200, paid.text
        sign_in(console, _url(console), Role.reader)

        page = console.get(f"/console/orders/{order_id}").text

        assert page.index("OrderPlaced") < page.index("PaymentCaptured")
        assert "till 7" in page and "checkout-42" in page
        assert "position 2" in page and "State at version 2" in page
        changed = page[page.index("PaymentCaptured") :]
        assert "<td>captured</td><td>0</td><td>3000</td>" in changed
        assert "<td>status</td><td>pending_payment</td><td>paid</td>" in changed

    def test_a_search_for_an_order_id_opens_it_and_a_bad_one_says_why(
        self, console: TestClient
    ) -> None:
        order_id = _place(console)
        sign_in(console, _url(console), Role.reader)
        found = console.get(
            "/console/orders", params={"order_id": order_id}, follow_redirects=False
        )
        assert found.headers["location"] == f"/console/orders/{order_id}"
        bad = console.get("/console/orders", params={"order_id": "12'3"})
        assert bad.status_code == 422 and "not an order id: &#34;12&#39;3&#34;" in bad.text


class TestDeadLetters:
    def test_dead_letters_are_grouped_by_target_and_retried_one_target_at_a_time(
        self, sqlite_url: str, receiver: WebhookReceiver
    ) -> None:
        """Two endpoints refuse; the page counts each one's dead letters, the confirmation
        says how many of that target go out again, and only those do. Subscriptions are
        listed without their secrets."""
        settings = Settings(
            database_url=sqlite_url,
            key_cache_ttl=0,
            webhook_allowed_networks=LOCAL_RECEIVERS,
            effect_max_attempts=1,
        )
        one, other = receiver.url, f"{receiver.url}/other"
        receiver.status = 500
        with TestClient(create_app(settings)) as console:
            admin = issue_key(sqlite_url, Role.admin)
            secrets = [
                console.post(
                    "/webhooks", json={"url": url, "event_types": ["*"]}, headers=bearer(admin)
                ).json()["secret"]
                for url in (one, other)
            ]
            _place(console)
            sign_in(console, sqlite_url, Role.admin)

            def by_target(status: str) -> dict[str, str]:
                page = console.get("/console/effects").text
                cell = rf'<td class="num" data-status="{status}">(\d+)</td>'
                return dict(re.findall(rf'<tr data-target="([^"]*)">.*?{cell}', page, re.S))

            wait_for(lambda: by_target("dead") == {one: "1", other: "1"}, "both dead")
            page = console.get("/console/effects").text
            assert one in page and other in page
            assert not any(secret in page for secret in secrets)
            # The dead letters of each order, with every attempt.
            dead = console.get("/console/effects?status=dead").text
            (section,) = re.findall(r'<section class="dead-order".*?</section>', dead, re.S)
            assert section.count('<table class="attempts">') == 2
            assert section.count("HTTP 500") == 2

            confirm = console.get("/console/effects-retry-dead", params={"target": one})
            assert re.search(r'id="dead-count">1<', confirm.text)
            receiver.status = 204
            retried = console.post(
                "/console/effects-retry-dead",
                data={"csrf": csrf_of(console), "target": one},
                follow_redirects=False,
            )
            assert retried.status_code == 303

            wait_for(lambda: len(receiver.accepted()) == 1, "the retried webhook delivered")
            assert receiver.accepted()[0].path == "/hooks"
            wait_for(lambda: by_target("delivered") == {one: "1", other: "0"}, "counted")
            assert by_target("dead") == {one: "0", other: "1"}


class TestProjectionsPage:
    def test_each_projection_shows_its_lag_over_the_last_hour(self, console: TestClient) -> None:
        """The worker in the process records a sample as it starts; the page draws it."""
        sign_in(console, _url(console), Role.reader)

        def chart() -> str | None:
            page = console.get("/console/projections").text
            row = re.search(r'<tr data-name="order_summaries">.*?</tr>', page, re.S)
            assert row is not None
            found = re.search(r'<svg class="lag"[^>]*>.*?<polyline points="([^"]+)"', row[0])
            return None if found is None else found.group(1)

        wait_for(lambda: chart() is not None, "a lag sample drawn")
        x, y = map(float, str(chart()).split()[-1].split(","))
        assert 116 <= x <= 120 and y == 23.0  # this minute (or the last), no lag
