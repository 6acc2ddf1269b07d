"""A real headless Chromium for the console's tests: the system's browser and driver (Debian
``chromium`` and ``chromium-driver``), nothing downloaded. Every page visited is saved as a
screenshot under var/console-screenshots, and a test fails on any browser console error,
Content-Security-Policy violations included."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests import REPO_ROOT

SCREENSHOTS = REPO_ROOT / "var" / "console-screenshots"
REQUIRED = "ORDERLEDGER_REQUIRE_BROWSER"
"""Set by .ci/run: a missing browser fails the browser tests instead of skipping them."""


def _executable(*names: str) -> str | None:
    return next((found for name in names if (found := shutil.which(name))), None)


class Browser:
    """One headless Chromium window on a server."""

    def __init__(self, driver: WebDriver, base_url: str, name: str) -> None:
        self.driver = driver
        self.base_url = base_url
        self.name = name
        self.shots = 0

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)
        self.shot()

    def shot(self) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.shots += 1
        path = SCREENSHOTS / f"{self.name}-{self.shots:02d}.png"
        self.driver.save_screenshot(str(path))
        return path

    def text(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "body").text)

    def fill(self, name: str, value: str) -> None:
        field = self.driver.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)

    def click(self, css: str) -> None:
        self.driver.find_element(By.CSS_SELECTOR, css).click()
        self.shot()

    def wait_until(self, check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
        """Poll ``check`` until it is true; an element replaced meanwhile is looked up again."""
        WebDriverWait(
            self.driver,
            timeout,
            poll_frequency=0.1,
            ignored_exceptions=(StaleElementReferenceException, NoSuchElementException),
        ).until(lambda _: check(), message=f"waited {timeout}s for {what}")
        self.shot()

    def sign_in(self, token: str) -> None:
        self.open("/console/sign-in")
        self.fill("api_key", token)
        self.click("form[action='/console/sign-in'] button")
        assert self.driver.current_url.endswith("/console/orders"), self.driver.current_url

    def errors(self) -> list[str]:
        """Console errors since the last call (CSP violations are reported there too)."""
        return [
            str(entry["message"])
            for entry in self.driver.get_log("browser")
            if entry["level"] == "SEVERE"
        ]


@contextmanager
def chromium(base_url: str, name: str) -> Iterator[Browser]:
    """A headless Chromium at 1280x800; fails the test if the page logged any error."""
    binary = _executable("chromium", "chromium-browser", "google-chrome")
    driver_path = _executable("chromedriver")
    if binary is None or driver_path is None:
        message = "Chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get(REQUIRED):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,800"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    browser = Browser(driver, base_url, name)
    try:
        yield browser
        errors = browser.errors()
        assert errors == [], f"the browser logged errors: {errors}"
    finally:
        driver.quit()
