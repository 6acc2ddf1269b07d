"""Shared fixtures: a real SQLite file per test, a real PostgreSQL database per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests import MASTER_KEY
from tests.support.receivers import SmtpServer, WebhookReceiver

# Every ledger a test opens seals personal data; Settings reads the key from here.
os.environ.setdefault("ORDERLEDGER_MASTER_KEY", MASTER_KEY)

POSTGRES_URL_VAR = "ORDERLEDGER_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_VAR = "ORDERLEDGER_REQUIRE_POSTGRES"

_postgres_outcomes: dict[str, int] = {"passed": 0, "skipped": 0}


def _admin_url() -> str | None:
    return os.environ.get(POSTGRES_URL_VAR) or None


def _with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, ""))


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    """A fresh SQLite file store."""
    return f"sqlite:///{tmp_path}/orderledger.db"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    admin = _admin_url()
    if admin is None:
        if os.environ.get(REQUIRE_POSTGRES_VAR):
            pytest.fail(f"{POSTGRES_URL_VAR} is not set but PostgreSQL tests are required")
        pytest.skip(f"set {POSTGRES_URL_VAR} to run PostgreSQL tests")
    dbname = f"orderledger_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
    except psycopg.OperationalError as error:
        # Never a skip: a configured server that cannot be reached is a failure.
        pytest.fail(f"PostgreSQL at {admin} is unreachable: {error}")
    try:
        yield _with_database(admin, dbname)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> str:
    """The same test on a SQLite file and on PostgreSQL."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(fixture))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "postgres" not in report.keywords:
        return
    if report.when == "call" and report.passed:
        _postgres_outcomes["passed"] += 1
    elif report.skipped:
        _postgres_outcomes["skipped"] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.environ.get(REQUIRE_POSTGRES_VAR):
        return
    if _postgres_outcomes["passed"] == 0 or _postgres_outcomes["skipped"] > 0:
        print(
            f"\nPostgreSQL tests are required: {_postgres_outcomes['passed']} passed, "
            f"{_postgres_outcomes['skipped']} skipped"
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """A webhook endpoint on loopback, up and answering 204."""
    receiver = WebhookReceiver()
    receiver.come_up()
    yield receiver
    receiver.close()


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """An SMTP server on loopback, up and accepting every message."""
    server = SmtpServer()
    server.come_up()
    yield server
    server.close()
