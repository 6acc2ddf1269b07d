"""What every orderledger command shares: settings, opening the stores, errors as one line."""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import typer
from eventsourcing.persistence import PersistenceError
from pydantic import ValidationError
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from api import bootstrap
from api.bootstrap import Opened, open_key_store, open_ledger
from api.key_store import ApiKeyStore
from api.settings import Settings
from domain.audit import UNKNOWN, Actor, CommandContext
from domain.errors import InvalidCommandError, OrderLedgerError
from domain.ledger import OrderLedger
from domain.personal import MasterKeyError

# Exit codes: 1 when the store or the order says no, 2 when the command line itself is wrong.
EXIT_FAILURE = 1
EXIT_USAGE = 2

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="Event store URL (sqlite:///path.db or postgresql://user@host/db); "
        "overrides ORDERLEDGER_DATABASE_URL.",
        show_default=False,
    ),
]


def stdout() -> Console:
    return Console(highlight=False)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    Console(stderr=True, highlight=False).print(f"Error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def redacted(url: str) -> str:
    """The URL without its password, fit for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def settings_from(database_url: str | None, **overrides: Any) -> Settings:
    """Settings from the environment, with command-line options winning."""
    values = {name: value for name, value in overrides.items() if value is not None}
    if database_url is not None:
        values["database_url"] = database_url
    try:
        return Settings(**values)
    except ValidationError as error:
        fail(settings_problem(error), EXIT_USAGE)


def settings_problem(error: ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
        for problem in error.errors()
    )
    return f"invalid settings: {problems}"


def open_ledger_or_fail(settings: Settings) -> OrderLedger:
    """The ledger, or one line saying why it cannot be opened."""
    try:
        return open_ledger(settings)
    except MasterKeyError as error:
        fail(str(error), EXIT_USAGE)
    except ValueError as error:
        fail(f"bad database URL {redacted(settings.database_url)!r}: {error}", EXIT_USAGE)
    except (PersistenceError, OSError) as error:
        fail(f"cannot open the event store at {redacted(settings.database_url)}: {error}")


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn the errors a command can expect into one line on stderr and an exit code."""
    try:
        yield
    except InvalidCommandError as error:
        fail(str(error), EXIT_USAGE)
    except OrderLedgerError as error:
        fail(str(error))
    except PersistenceError as error:
        fail(f"the event store failed: {error}")
    except OSError as error:
        fail(str(error))


@contextmanager
def opened(database_url: str | None) -> Iterator[Opened]:
    """The ledger and the read models; a store that fails is one line and an exit code (a bad
    URL or an unreachable store: the console script's last resort, api/cli/main.py)."""
    try:
        with bootstrap.opened(settings_from(database_url)) as system:
            yield system
    except (SQLAlchemyError, PersistenceError) as error:
        fail(f"the database failed: {type(error).__name__}")


@contextmanager
def key_store(database_url: str | None) -> Iterator[tuple[ApiKeyStore, Settings]]:
    """The key store of the configured event store, with expected failures as one line."""
    settings = settings_from(database_url)
    try:
        store = open_key_store(settings)
    except ValueError as error:
        fail(f"bad database URL {redacted(settings.database_url)!r}: {error}", EXIT_USAGE)
    except (SQLAlchemyError, OSError) as error:
        fail(f"cannot open the key store: {type(error).__name__}: {error}")
    try:
        yield store, settings
    except SQLAlchemyError as error:
        fail(f"the database failed: {type(error).__name__}")
    finally:
        store.close()


def parse_moment(text: str, option: str) -> datetime:
    """An ISO 8601 time with a timezone from an option, or one line and exit code 2."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        fail(f"{option} {text!r} is not an ISO 8601 time such as 2026-01-31T12:00:00Z", EXIT_USAGE)
    if moment.tzinfo is None:
        fail(
            f"{option} {text!r} has no timezone; add one, e.g. {text}Z or {text}+01:00", EXIT_USAGE
        )
    return moment


def cli_context(command: str) -> CommandContext:
    """Commands issued from the command line: ``cli``, the operating system's user, the command."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no user name in the environment or the password database
        user = UNKNOWN
    return CommandContext(Actor("cli", user, f"orderledger {command}"))
