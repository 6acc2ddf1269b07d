"""Fixtures starting real `orderledger` processes; their output is shown when a test fails."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.support.processes import Deployment, Server, iter_logs

_DEPLOYMENTS = pytest.StashKey[list[Deployment]]()

Deploy = Callable[..., Deployment]

PATIENT_READS = {"read_your_writes_timeout": 30}
"""A min_position read waits this long (not 5 s) before a 503: the test machine may be loaded."""

_LOG_TAIL = 20_000
"""Characters of each process's output shown with a failure."""


@pytest.fixture
def deploy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deploy]:
    """Make deployments on a store; at the end SIGTERM what still runs and require exit 0."""
    deployments = request.node.stash.setdefault(_DEPLOYMENTS, [])

    def make(database_url: str, **settings: object) -> Deployment:
        directory = tmp_path / f"deployment-{len(deployments)}"
        directory.mkdir()
        deployment = Deployment(directory, database_url, {**PATIENT_READS, **settings})
        deployments.append(deployment)
        return deployment

    yield make
    codes: dict[str, int] = {}
    for deployment in deployments:
        codes.update(deployment.close())
    unclean = {name: code for name, code in codes.items() if code != 0}
    assert not unclean, f"processes did not exit 0 after SIGTERM: {unclean}"


@pytest.fixture
def deployment(store_url: str, deploy: Deploy) -> Deployment:
    """A deployment on a fresh SQLite file or PostgreSQL database (stopped before it is
    dropped: the store fixture comes first so it is torn down last)."""
    return deploy(store_url)


@pytest.fixture
def postgres_deployment(postgres_url: str, deploy: Deploy) -> Deployment:
    """A deployment on a fresh PostgreSQL database."""
    return deploy(postgres_url)


@pytest.fixture
def server(deployment: Deployment) -> Server:
    """`orderledger serve` on a fresh SQLite file or PostgreSQL database, with an admin key."""
    return deployment.serve()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach every process's output to a failed setup, call or teardown."""
    report = yield
    if report.failed:
        for title, text in iter_logs(item.stash.get(_DEPLOYMENTS, [])):
            report.sections.append((title, text[-_LOG_TAIL:]))
    return report
