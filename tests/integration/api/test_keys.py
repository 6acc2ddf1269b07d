"""The key store on SQLite and PostgreSQL, and the /keys endpoints."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from api.key_store import ApiKeyStore, IssuedKey, KeyNotFoundError, Role
from tests.support.auth import bearer
from tests.support.http import assert_problem


@pytest.fixture
def store(store_url: str) -> Iterator[ApiKeyStore]:
    """A key store with no cache, so every lookup reads the table."""
    opened = ApiKeyStore.from_url(store_url, cache_ttl=0)
    try:
        yield opened
    finally:
        opened.close()


def raw_rows(store: ApiKeyStore) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(text("SELECT * FROM api_keys"))]


class TestStorage:
    def test_the_table_holds_the_hash_of_the_token_never_the_token(
        self, store: ApiKeyStore
    ) -> None:
        issued = store.create(Role.writer, "billing robot")
        secret = issued.token.rsplit("_", 1)[1]
        [row] = raw_rows(store)
        assert row["token_sha256"] == hashlib.sha256(issued.token.encode()).hexdigest()
        for value in row.values():
            assert issued.token not in str(value)
            assert secret not in str(value)
        assert (row["key_id"], row["name"], row["role"]) == (
            issued.key_id,
            "billing robot",
            "writer",
        )

    def test_tokens_are_distinct_and_carry_their_key_id(self, store: ApiKeyStore) -> None:
        issued = [store.create(Role.reader) for _ in range(20)]
        assert len({key.token for key in issued}) == 20
        for key in issued:
            assert key.token.startswith(f"olk_{key.key_id}_")
            assert len(key.token) == len("olk_") + 16 + 1 + 43

    def test_keys_survive_reopening_the_store(self, store_url: str, store: ApiKeyStore) -> None:
        issued = store.create(Role.admin, "ops")
        again = ApiKeyStore.from_url(store_url)
        try:
            assert again.authenticate(issued.token) is not None
            assert [key.key_id for key in again.list()] == [issued.key_id]
        finally:
            again.close()

    def test_a_name_too_long_is_refused(self, store: ApiKeyStore) -> None:
        with pytest.raises(ValueError, match="at most 200"):
            store.create(Role.reader, "x" * 201)
        assert raw_rows(store) == []


class TestAuthenticate:
    def test_a_good_token_gives_its_principal(self, store: ApiKeyStore) -> None:
        issued = store.create(Role.writer, "robot")
        principal = store.authenticate(issued.token)
        assert principal is not None
        assert (principal.key_id, principal.name, principal.role) == (
            issued.key_id,
            "robot",
            Role.writer,
        )

    def test_anything_else_gives_nothing(self, store: ApiKeyStore) -> None:
        issued = store.create(Role.admin)
        other = store.create(Role.reader)
        key_id, secret = issued.key_id, issued.token.rsplit("_", 1)[1]
        wrong_secret = secret[:-1] + ("A" if secret[-1] != "A" else "B")
        forged = [
            "",
            "olk_",
            issued.token + "x",
            issued.token[:-1],
            f"olk_{key_id}_{wrong_secret}",
            f"olk_{other.key_id}_{secret}",  # a real secret under another key's id
            f"olk_{'f' * 16}_{secret}",  # an id nobody has
            issued.token.upper(),
            f" {issued.token}",
        ]
        for token in forged:
            assert store.authenticate(token) is None, token

    def test_last_used_is_recorded_once_not_on_every_request(self, store: ApiKeyStore) -> None:
        issued = store.create(Role.reader)
        assert store.list()[0].last_used_at is None
        store.authenticate(issued.token)
        first = store.list()[0].last_used_at
        assert first is not None
        store.authenticate(issued.token)
        assert store.list()[0].last_used_at == first


class TestRevokeAndList:
    def test_a_revoked_key_no_longer_authenticates(self, store: ApiKeyStore) -> None:
        kept = store.create(Role.reader, "kept")
        revoked = store.create(Role.reader, "gone")
        assert store.authenticate(revoked.token) is not None
        result = store.revoke(revoked.key_id)
        assert result.revoked_at is not None
        assert not result.active
        assert store.authenticate(revoked.token) is None
        assert store.authenticate(kept.token) is not None

    def test_revoking_again_keeps_the_first_revocation(self, store: ApiKeyStore) -> None:
        issued = store.create(Role.reader)
        first = store.revoke(issued.key_id).revoked_at
        assert store.revoke(issued.key_id).revoked_at == first

    def test_revoking_an_unknown_key_is_an_error(self, store: ApiKeyStore) -> None:
        with pytest.raises(KeyNotFoundError, match="no API key has the id"):
            store.revoke("0123456789abcdef")

    def test_the_list_has_every_key_oldest_first_and_no_token(self, store: ApiKeyStore) -> None:
        issued = [store.create(role, f"key {role}") for role in Role]
        store.revoke(issued[1].key_id)
        listed = store.list()
        assert [key.key_id for key in listed] == [key.key_id for key in issued]
        assert [key.role for key in listed] == list(Role)
        assert [key.active for key in listed] == [index != 1 for index in range(len(issued))]
        for key in listed:
            assert not hasattr(key, "token")

    def test_a_cached_store_forgets_a_key_it_revoked_itself(self, store_url: str) -> None:
        cached = ApiKeyStore.from_url(store_url, cache_ttl=60)
        try:
            issued = cached.create(Role.reader)
            assert cached.authenticate(issued.token) is not None
            cached.revoke(issued.key_id)
            assert cached.authenticate(issued.token) is None
        finally:
            cached.close()


class TestCache:
    """A key in use stays cached (re-checked in the background); a revoked one drops out."""

    TTL = 0.4

    def test_a_key_in_use_never_expires_from_the_cache(self, store_url: str) -> None:
        cached = ApiKeyStore.from_url(store_url, cache_ttl=self.TTL)
        try:
            issued = cached.create(Role.reader)
            assert cached.authenticate(issued.token) is not None
            deadline = time.monotonic() + 4 * self.TTL
            while time.monotonic() < deadline:
                assert cached.cached(issued.token) is not None
                time.sleep(0.02)
        finally:
            cached.close()

    def test_a_key_revoked_elsewhere_drops_out_within_the_ttl_while_in_use(
        self, store_url: str
    ) -> None:
        cached = ApiKeyStore.from_url(store_url, cache_ttl=self.TTL)
        elsewhere = ApiKeyStore.from_url(store_url, cache_ttl=0)
        try:
            issued = cached.create(Role.reader)
            assert cached.authenticate(issued.token) is not None
            time.sleep(self.TTL / 3)
            elsewhere.revoke(issued.key_id)
            revoked_at = time.monotonic()
            while cached.cached(issued.token) is not None:
                assert time.monotonic() - revoked_at < self.TTL + 0.05
                time.sleep(0.01)
            time.sleep(self.TTL)
            assert cached.cached(issued.token) is None
            assert cached.authenticate(issued.token) is None
        finally:
            elsewhere.close()
            cached.close()


class TestBootstrap:
    def test_the_first_admin_is_created_once(self, store: ApiKeyStore) -> None:
        first = store.create_first_admin()
        assert first is not None
        assert first.role == Role.admin
        assert store.create_first_admin() is None
        assert [key.key_id for key in store.list()] == [first.key_id]

    def test_no_bootstrap_key_once_any_key_exists_even_revoked(self, store: ApiKeyStore) -> None:
        store.revoke(store.create(Role.reader).key_id)
        assert store.create_first_admin() is None

    def test_concurrent_bootstraps_issue_one_key(self, store_url: str) -> None:
        """Several processes starting at once (here threads with their own stores)."""
        stores = [ApiKeyStore.from_url(store_url) for _ in range(6)]
        results: list[IssuedKey | None] = []
        barrier = threading.Barrier(len(stores))

        def boot(store: ApiKeyStore) -> None:
            barrier.wait()
            results.append(store.create_first_admin())

        threads = [threading.Thread(target=boot, args=(store,)) for store in stores]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            issued = [result for result in results if result is not None]
            assert len(results) == len(stores)
            assert len(issued) == 1
            assert [key.key_id for key in stores[0].list()] == [issued[0].key_id]
        finally:
            for store in stores:
                store.close()


class TestKeysOverHttp:
    def test_a_key_issued_over_http_works_with_its_role_until_revoked(
        self, store_client: TestClient
    ) -> None:
        created = store_client.post("/keys", json={"role": "reader", "name": "dashboard"})
        assert created.status_code == 201, created.text
        body = created.json()
        assert (body["role"], body["name"], body["active"]) == ("reader", "dashboard", True)
        key = bearer(body["token"])

        assert store_client.get("/projections", headers=key).status_code == 200
        assert_problem(store_client.post("/orders", json={}, headers=key), 403)

        listed = store_client.get("/keys")
        assert listed.status_code == 200
        assert body["token"] not in listed.text
        [entry] = [item for item in listed.json()["data"] if item["key_id"] == body["key_id"]]
        assert "token" not in entry

        assert store_client.delete(f"/keys/{body['key_id']}").status_code == 204
        assert_problem(store_client.get("/projections", headers=key), 401)
        [entry] = [
            k for k in store_client.get("/keys").json()["data"] if k["key_id"] == body["key_id"]
        ]
        assert entry["active"] is False
        assert entry["revoked_at"] is not None

    def test_revoking_an_unknown_key_is_a_404_problem(self, client: TestClient) -> None:
        assert_problem(client.delete("/keys/0123456789abcdef"), 404)

    @pytest.mark.parametrize(
        "body",
        [
            {},
            {"role": "root"},
            {"role": "reader", "scopes": ["all"]},
            {"role": "reader", "name": 7},
            {"role": "reader", "name": "x" * 201},
        ],
    )
    def test_an_invalid_request_is_a_422_problem(
        self, client: TestClient, body: dict[str, Any]
    ) -> None:
        before = len(client.get("/keys").json()["data"])
        assert_problem(client.post("/keys", json=body), 422)
        assert len(client.get("/keys").json()["data"]) == before

    @pytest.mark.parametrize("key_id", ["nope", "0123456789ABCDEF", "0" * 17])
    def test_a_malformed_key_id_is_a_422_problem(self, client: TestClient, key_id: str) -> None:
        assert_problem(client.delete(f"/keys/{key_id}"), 422)
