"""`orderledger keys`: create, list, revoke and bootstrap, run in-process on real stores."""

from __future__ import annotations

import re

import pytest
from click.testing import Result
from typer.testing import CliRunner

from api.cli.main import app
from api.key_store import ApiKeyStore, Role

TOKEN = re.compile(r"olk_([0-9a-f]{16})_[A-Za-z0-9_-]{43}")


def invoke(url: str, *args: str) -> Result:
    """Run the CLI in-process on the store at ``url``, wide enough that rich never wraps."""
    env = {"COLUMNS": "250", "ORDERLEDGER_DATABASE_URL": None}
    return CliRunner().invoke(app, ["keys", *args, "--database-url", url], env=env)


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def role_of(url: str, token: str) -> Role | None:
    """The role the store grants the token, or None if it grants nothing."""
    store = ApiKeyStore.from_url(url, cache_ttl=0)
    try:
        principal = store.authenticate(token)
        return None if principal is None else principal.role
    finally:
        store.close()


class TestCreate:
    def test_quiet_prints_the_token_alone_and_it_has_the_role(self, store_url: str) -> None:
        output = ok(invoke(store_url, "create", "--role", "writer", "--quiet"))
        token = output.strip()
        assert output == token + "\n"
        assert TOKEN.fullmatch(token)
        assert role_of(store_url, token) == Role.writer

    def test_create_prints_the_key_once_with_a_warning(self, sqlite_url: str) -> None:
        output = ok(invoke(sqlite_url, "create", "--role", "reader", "--name", "dashboard"))
        match = TOKEN.search(output)
        assert match is not None, output
        assert f"API key {match.group(1)} (dashboard), role reader" in output
        assert "shown only now" in output
        assert role_of(sqlite_url, match.group(0)) == Role.reader

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--role", "root"], "'root' is not one of"),
            ([], "Missing option '--role'"),
            (["--role", "reader", "--name", "x" * 201], "at most 200 characters"),
        ],
    )
    def test_bad_arguments_exit_2_and_create_nothing(
        self, sqlite_url: str, args: list[str], message: str
    ) -> None:
        result = invoke(sqlite_url, "create", *args)
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "Traceback" not in result.output
        assert "No API keys yet" in ok(invoke(sqlite_url, "list"))


class TestListAndRevoke:
    def test_list_shows_each_key_never_a_token_and_revoke_marks_it(self, store_url: str) -> None:
        admin = ok(invoke(store_url, "create", "--role", "admin", "--name", "ops", "-q")).strip()
        reader = ok(invoke(store_url, "create", "--role", "reader", "--name", "bi", "-q")).strip()
        admin_id, reader_id = admin.split("_")[1], reader.split("_")[1]

        listed = ok(invoke(store_url, "list"))
        assert "olk_" not in listed
        rows = {
            line.split()[1]: line
            for line in listed.splitlines()
            if admin_id in line or reader_id in line
        }
        assert set(rows) == {admin_id, reader_id}
        assert re.search(r"\bops\b.*\badmin\b.*\bactive\b", rows[admin_id])
        assert re.search(r"\bbi\b.*\breader\b.*\bactive\b", rows[reader_id])
        assert "2 key(s), 2 active." in listed

        revoked = ok(invoke(store_url, "revoke", reader_id))
        assert f"Revoked key {reader_id} (bi, reader)" in revoked
        assert role_of(store_url, reader) is None
        assert role_of(store_url, admin) == Role.admin
        listed = ok(invoke(store_url, "list"))
        assert re.search(rf"{reader_id}.*\brevoked\b", listed)
        assert "2 key(s), 1 active." in listed

    def test_revoking_an_unknown_key_fails_with_one_line(self, sqlite_url: str) -> None:
        result = invoke(sqlite_url, "revoke", "0123456789abcdef")
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [
            "Error: no API key has the id '0123456789abcdef'"
        ]

    def test_a_bad_database_url_fails_cleanly(self) -> None:
        result = invoke("mysql://nowhere/db", "list")
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert result.output.startswith("Error: bad database URL")


class TestBootstrap:
    def test_bootstrap_issues_one_admin_key_and_a_curl_line_then_nothing(
        self, store_url: str
    ) -> None:
        first = ok(invoke(store_url, "bootstrap"))
        match = TOKEN.search(first)
        assert match is not None, first
        token = match.group(0)
        assert role_of(store_url, token) == Role.admin
        curl = f'curl -H "Authorization: Bearer {token}" http://127.0.0.1:8000/orders'
        assert curl in first

        again = ok(invoke(store_url, "bootstrap"))
        assert "already exist; none created" in again
        assert "olk_" not in again
        assert "1 key(s), 1 active." in ok(invoke(store_url, "list"))
