"""The console in a real headless Chromium against a real `orderledger serve`.

Sign-in and sign-out, order search and the timeline, a rebuild followed live (htmx under the
strict Content-Security-Policy) to its cut-over, forms without their CSRF token refused, a dead
letter retried until delivered, and a hostile SKU shown as text. Any browser console error, CSP
violations included, fails the test.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By

from tests.e2e.conftest import Deploy
from tests.support.browser import Browser, chromium
from tests.support.console import HOSTILE_SKU, QUOTED_CUSTOMER
from tests.support.http import order_body
from tests.support.processes import Server
from tests.support.receivers import WebhookReceiver
from tests.support.waiting import wait_for


@pytest.fixture
def console_server(store_url: str, deploy: Deploy) -> Server:
    """serve on each store, workers in the process, delivering to the local receiver."""
    return deploy(store_url, webhook_allowed_networks="127.0.0.0/8").serve(
        effect_max_attempts=1, effect_backoff_base=0.05
    )


@pytest.fixture
def browser(console_server: Server, request: pytest.FixtureRequest) -> Iterator[Browser]:
    with chromium(console_server.base_url, request.node.name) as opened:
        opened.sign_in(console_server.admin_token)
        yield opened


def _place(server: Server, **overrides: object) -> str:
    with server.client() as http:
        placed = http.post("/orders", json=order_body(**overrides))
        assert placed.status_code == 201, placed.text
        order_id = str(placed.json()["order_id"])
        position = placed.json()["position"]
        read = http.get(f"/orders/{order_id}", params={"min_position": position})
        assert read.status_code == 200, read.text
    return order_id


def test_sign_in_search_the_timeline_and_sign_out(console_server: Server, browser: Browser) -> None:
    order_id = _place(console_server, customer_id="cust-ada")
    _place(console_server, customer_id="cust-bob")

    browser.open("/console/orders")
    browser.fill("customer_id", "cust-ada")
    browser.click("form.filters button")
    rows = browser.driver.find_elements(By.CSS_SELECTOR, "#orders tbody tr")
    assert len(rows) == 1 and "cust-ada" in rows[0].text

    browser.click(f"a[href='/console/orders/{order_id}']")
    assert "OrderPlaced" in browser.text() and "version 1" in browser.text()
    browser.click("details summary")
    assert "State at version 1" in browser.text() and "pending_payment" in browser.text()

    browser.click("form.who button")
    assert browser.driver.current_url.endswith("/console/sign-in")
    browser.open("/console/orders")
    assert browser.driver.current_url.endswith("/console/sign-in")


def test_a_rebuild_is_followed_live_to_its_cut_over(
    console_server: Server, browser: Browser
) -> None:
    _place(console_server)
    browser.open("/console/projections")
    row = "tr[data-name='order_summaries']"

    browser.click(f"{row} form button")

    def cells() -> tuple[str, str]:
        # Read in one script: htmx may swap the table between two element look-ups.
        found = browser.driver.execute_script(
            "const row = document.querySelector(arguments[0]);"
            "return [row.querySelector('.generation').textContent,"
            " row.querySelector('.state').textContent];",
            row,
        )
        return (str(found[0]).strip(), str(found[1]).strip())

    # No reload: htmx refreshes the table every 2 s until the new generation serves.
    browser.wait_until(lambda: cells() == ("2", "live"), "generation 2 to serve, live")


def test_a_dead_letter_is_retried_until_delivered(
    console_server: Server, browser: Browser, receiver: WebhookReceiver
) -> None:
    receiver.status = 500
    with console_server.client() as http:
        added = http.post("/webhooks", json={"url": receiver.url, "event_types": ["*"]})
        assert added.status_code == 201, added.text
    _place(console_server)

    def dead_count() -> str:
        browser.open("/console/effects")
        return str(browser.driver.find_element(By.CSS_SELECTOR, "[data-status='dead']").text)

    wait_for(lambda: dead_count() == "1", "the webhook to go dead", timeout=30)
    browser.click("#effects tbody a")
    assert "HTTP 500" in browser.text()

    receiver.status = 204
    browser.click("form[action$='/retry'] button")
    browser.wait_until(
        lambda: (
            (browser.driver.refresh() or True)
            and browser.driver.find_element(By.CSS_SELECTOR, ".status").text == "delivered"
        ),
        "the retried webhook to be delivered",
    )
    assert len(receiver.accepted()) == 1


def _projection(server: Server, name: str) -> dict[str, object]:
    with server.client() as http:
        found: dict[str, object] = http.get(f"/projections/{name}").json()
    return found


@contextmanager
def _forged_form_site(action: str) -> Iterator[str]:
    """Another site's page (another port: same host, another origin) whose script posts a
    form to ``action`` as soon as it loads, with a guessed CSRF token."""
    page = (
        f'<form id="forged" method="post" action="{action}">'
        '<input name="csrf" value="guessed"></form>'
        "<script>document.getElementById('forged').submit()</script>"
    ).encode()

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    site = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}/"
    finally:
        site.shutdown()
        site.server_close()


def test_a_form_without_its_csrf_token_changes_nothing(
    console_server: Server, browser: Browser
) -> None:
    """The console's own form with its token altered, and another site's forged form posted
    with the signed-in admin's cookie, are both refused; the projection is not rebuilt."""
    _place(console_server)
    browser.open("/console/projections")
    row = "tr[data-name='order_summaries']"
    browser.driver.execute_script(
        "document.querySelector(arguments[0] + \" input[name='csrf']\").value = 'altered'", row
    )
    browser.click(f"{row} form button")
    assert "CSRF token is missing or wrong" in browser.text()
    [refused] = browser.errors()
    assert "status of 403" in refused

    action = f"{console_server.base_url}/console/projections/order_summaries/rebuild"
    with _forged_form_site(action) as site:
        browser.driver.get(site)
        browser.wait_until(lambda: "CSRF token" in browser.text(), "the forged post refused")
    assert browser.driver.current_url == action
    [refused] = browser.errors()
    assert "status of 403" in refused

    status = _projection(console_server, "order_summaries")
    assert (status["serving_generation"], status["rebuild"]) == (1, None)
    browser.open("/console/projections")
    assert browser.driver.find_element(By.CSS_SELECTOR, f"{row} .state").text == "live"


def test_hostile_values_are_shown_as_text(console_server: Server, browser: Browser) -> None:
    lines = [{"sku": HOSTILE_SKU, "quantity": 1, "unit_price": 100}]
    order_id = _place(console_server, customer_id=QUOTED_CUSTOMER, lines=lines)

    browser.open(f"/console/orders/{order_id}")
    browser.click("details summary")
    with pytest.raises(NoAlertPresentException):
        browser.driver.switch_to.alert.accept()
    assert HOSTILE_SKU in browser.text() and QUOTED_CUSTOMER in browser.text()

    browser.open("/console/orders/%3Cimg%20src%3Dx%3E")
    assert "<img src=x>" in browser.text()
    [not_found] = browser.errors()  # the page's own 404, and nothing else
    assert "status of 404" in not_found


def test_every_page_fits_a_laptop_and_a_phone(console_server: Server, browser: Browser) -> None:
    order_id = _place(console_server)
    pages = ["/console/orders", f"/console/orders/{order_id}", "/console/projections"]
    pages += ["/console/effects", "/console/audit"]
    for width, height in ((1280, 800), (390, 844)):
        browser.driver.set_window_size(width, height)
        for page in pages:
            browser.open(page)
            overflow = browser.driver.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, f"{page} is {overflow}px wider than {width}px"
