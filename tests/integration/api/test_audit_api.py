"""GET /audit, checkpoints and POST /audit/verify, and the auditor role that reads them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from api.bootstrap import opened
from api.http.app import create_app
from api.key_store import Role
from api.settings import Settings
from projections.audit_log import NAME as AUDIT_LOG
from tests.support.auth import bearer, issue_key
from tests.support.http import assert_problem, order_body
from tests.support.raw_events import RawEvents


def _key(client: TestClient, role: str, name: str) -> tuple[dict[str, str], str]:
    issued = client.post("/keys", json={"role": role, "name": name})
    assert issued.status_code == 201, issued.text
    return {"Authorization": f"Bearer {issued.json()['token']}"}, issued.json()["key_id"]


def _ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


class Shop:
    """Two writers: checkout places and pays, backoffice ships; one correlation each."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        checkout, self.checkout_id = _key(client, "writer", "checkout")
        backoffice, self.backoffice_id = _key(client, "writer", "backoffice")
        cart = {**checkout, "Correlation-Id": "cart-1"}
        self.order_id = _ok(client.post("/orders", json=order_body(), headers=cart), 201)[
            "order_id"
        ]
        payment = {"amount": 3000, "payment_reference": "psp-1"}
        _ok(client.post(f"/orders/{self.order_id}/payments", json=payment, headers=cart))
        self.other_id = _ok(
            client.post("/orders", json=order_body(customer_id="cust-7"), headers=checkout), 201
        )["order_id"]
        shipped = _ok(
            client.post(
                f"/orders/{self.order_id}/shipment",
                json={"carrier": "DHL", "tracking_number": "JD1"},
                headers={**backoffice, "Correlation-Id": "warehouse-9"},
            )
        )
        self.head = shipped["position"]

    def log(self, **params: Any) -> list[dict[str, Any]]:
        page = _ok(self.client.get("/audit", params={"min_position": self.head, **params}))
        return list(page["data"])


@pytest.fixture
def shop(client: TestClient) -> Shop:
    return Shop(client)


class TestTheAuditLog:
    def test_lists_every_event_newest_first_with_who_and_why(self, shop: Shop) -> None:
        entries = shop.log()

        assert [e["position"] for e in entries] == sorted(
            (e["position"] for e in entries), reverse=True
        )
        assert entries[0]["position"] == shop.head
        newest = entries[0]
        assert newest["event_type"] == "OrderShipped"
        assert newest["actor"] == {
            "kind": "key",
            "id": shop.backoffice_id,
            "name": "backoffice",
            "role": "writer",
        }
        assert newest["correlation_id"] == "warehouse-9"
        assert len(newest["chain_hash"]) == 64
        assert newest["order_id"] == shop.order_id

    @pytest.mark.parametrize(
        ("filters", "expected"),
        [
            ({"event_type": "PaymentCaptured"}, [("order", 2)]),
            ({"correlation_id": "cart-1"}, [("order", 2), ("order", 1)]),
            ({"correlation_id": "warehouse-9"}, [("order", 3)]),
        ],
    )
    def test_filters(
        self, shop: Shop, filters: dict[str, str], expected: list[tuple[str, int]]
    ) -> None:
        ids = {"order": shop.order_id, "other": shop.other_id}
        found = [(e["order_id"], e["version"]) for e in shop.log(**filters)]
        assert found == [(ids[name], version) for name, version in expected]

    def test_filters_by_actor_and_order(self, shop: Shop) -> None:
        by_backoffice = shop.log(actor=shop.backoffice_id)
        assert [(e["order_id"], e["version"]) for e in by_backoffice] == [(shop.order_id, 3)]
        by_order = shop.log(order_id=shop.other_id)
        assert [e["event_type"] for e in by_order] == ["OrderPlaced"]

    def test_filters_by_time_in_any_timezone(self, shop: Shop) -> None:
        entries = shop.log(order="asc")
        middle = (
            datetime.fromisoformat(entries[1]["recorded_at"])
            .astimezone(timezone(timedelta(hours=-5)))
            .isoformat()
        )
        later = shop.log(**{"from": middle, "order": "asc"})
        earlier = shop.log(to=middle, order="asc")
        assert later + earlier != []
        assert [e["position"] for e in earlier + later] == sorted(e["position"] for e in entries)
        assert later[0]["position"] == entries[1]["position"]

    def test_keyset_pages_cover_the_log_once_in_either_order(self, shop: Shop) -> None:
        everything = [e["position"] for e in shop.log(order="asc")]
        for order in ("asc", "desc"):
            seen: list[int] = []
            params: dict[str, Any] = {"limit": 2, "order": order}
            while True:
                page = _ok(shop.client.get("/audit", params=params))
                seen += [e["position"] for e in page["data"]]
                if page["next_cursor"] is None:
                    break
                params["cursor"] = page["next_cursor"]
            assert seen == (everything if order == "asc" else everything[::-1])

    @pytest.mark.parametrize(
        ("query", "fragment"),
        [
            ("from=2026-01-01T00:00:00", "timezone"),
            ("to=9999-12-31T23:59:59-14:00", "range"),
            ("cursor=not-a-cursor", "cursor"),
            ("actor=%00", "printable"),
            ("limit=0", "limit"),
            ("order=sideways", "order"),
        ],
    )
    def test_bad_queries_are_problems(self, client: TestClient, query: str, fragment: str) -> None:
        problem = assert_problem(client.get(f"/audit?{query}"), 422)
        assert fragment in str(problem).lower()


class TestAnAuditor:
    def test_reads_everything_and_verifies_but_cannot_command_or_configure(
        self, client: TestClient, shop: Shop
    ) -> None:
        auditor = bearer(issue_key(str(client.app.state.settings.database_url), Role.auditor))  # type: ignore[attr-defined]

        assert _ok(client.get("/audit", headers=auditor, params={"min_position": shop.head}))
        assert _ok(client.get(f"/orders/{shop.order_id}/history", headers=auditor))
        for path in ("/webhooks", "/effects", "/keys", "/audit/checkpoints"):
            _ok(client.get(path, headers=auditor))
        assert _ok(client.post("/audit/verify", json={}, headers=auditor))["ok"] is True
        refused = [
            client.post("/orders", json=order_body(), headers=auditor),
            client.post(f"/orders/{shop.order_id}/delivery", json={}, headers=auditor),
            client.post("/webhooks", json={"url": "http://127.0.0.1:9/h"}, headers=auditor),
            client.post("/keys", json={"role": "admin"}, headers=auditor),
            client.post("/projections/audit_log/rebuild", headers=auditor),
        ]
        for response in refused:
            assert_problem(response, 403, "forbidden")

    def test_writers_and_readers_cannot_read_the_audit_log(
        self, client: TestClient, shop: Shop
    ) -> None:
        url = str(client.app.state.settings.database_url)  # type: ignore[attr-defined]
        for role in (Role.reader, Role.writer):
            headers = bearer(issue_key(url, role))
            assert_problem(client.get("/audit", headers=headers), 403, "forbidden")
            assert_problem(client.post("/audit/verify", json={}, headers=headers), 403)


class TestCheckpointsAndVerify:
    def test_a_checkpoint_taken_is_listed_and_verifies(
        self, client: TestClient, shop: Shop
    ) -> None:
        shop.log()  # the audit log has caught up
        taken = _ok(client.post("/audit/checkpoints"), 201)
        assert (taken["position"], taken["events"], taken["reason"]) == (
            shop.head,
            shop.head,
            "requested",
        )
        listed = _ok(client.get("/audit/checkpoints"))["data"]
        assert taken in listed

        report = _ok(client.post("/audit/verify", json={"checkpoints": [taken]}))
        assert report["ok"] is True, report
        assert report["checkpoints_checked"] == 2
        assert report["events_checked"] == shop.head

        forged = {**taken, "digest": "0" * 64}
        report = _ok(client.post("/audit/verify", json={"checkpoints": [forged]}))
        assert report["ok"] is False
        assert report["problem"]["kind"] == "checkpoint_mismatch"

    def test_one_order(self, client: TestClient, shop: Shop) -> None:
        report = _ok(client.post("/audit/verify", json={"order_id": shop.order_id}))
        assert (report["ok"], report["order_id"], report["events_checked"]) == (
            True,
            shop.order_id,
            3,
        )

    @pytest.mark.parametrize(
        ("body", "status"),
        [
            ({"order_id": "0b4a5f8e-6f2d-4c1e-9a57-3d2f1e0c9b8a"}, 404),
            ({"checkpoints": [{"position": 1}]}, 422),
            ({"unknown": 1}, 422),
            (
                {
                    "checkpoints": [
                        {
                            "algorithm": "md5",
                            "position": 1,
                            "events": 1,
                            "digest": "0" * 64,
                            "created_at": "2026-01-01T00:00:00Z",
                            "reason": "given",
                        }
                    ]
                },
                422,
            ),
            (
                {
                    "checkpoints": [
                        {
                            "algorithm": "sha256-chain-v1",
                            "position": 1,
                            "events": 1,
                            "digest": "zz",
                            "created_at": "2026-01-01T00:00:00Z",
                            "reason": "given",
                        }
                    ]
                },
                422,
            ),
        ],
    )
    def test_bad_requests_are_problems(
        self, client: TestClient, body: dict[str, Any], status: int
    ) -> None:
        assert_problem(client.post("/audit/verify", json=body), status)


class TestVerifyOnEveryStore:
    def test_a_checkpoint_handed_out_verifies_when_given_back(
        self, store_client: TestClient
    ) -> None:
        """Taken over HTTP, kept outside, given back: it matches (its tx says where it sits)."""
        shop = Shop(store_client)
        shop.log()
        checkpoint = _ok(store_client.post("/audit/checkpoints"), 201)
        Shop(store_client).log()  # more events after it

        report = _ok(store_client.post("/audit/verify", json={"checkpoints": [checkpoint]}))

        assert report["ok"] is True, report["problem"]
        assert report["checkpoints_checked"] >= 1

    def test_finds_an_altered_event(self, store_client: TestClient) -> None:
        shop = Shop(store_client)
        shop.log()
        url = str(store_client.app.state.settings.database_url)  # type: ignore[attr-defined]
        history = _ok(store_client.get(f"/orders/{shop.order_id}/history"))["events"]
        paid = history[1]["position"]
        table = store_client.app.state.ledger.recorder.events_table_name  # type: ignore[attr-defined]
        RawEvents(url, table).rewrite_state(paid, b"psp-1", b"psp-2")

        report = _ok(store_client.post("/audit/verify", json={}))
        assert report["ok"] is False
        assert report["problem"]["kind"] == "altered"
        assert (report["problem"]["position"], report["problem"]["order_id"]) == (
            paid,
            shop.order_id,
        )


class TestDuringAnUpgrade:
    def test_an_audit_log_built_by_the_older_version_answers_503_until_rebuilt(
        self, store_url: str
    ) -> None:
        """Its tables lack this version's columns: reads say so and when to retry, never 500."""
        settings = Settings(database_url=store_url, run_projections=False, run_effects=False)
        with opened(settings) as system:
            system.ledger.place_order(**order_body())
            system.runtime.worker().run_until_caught_up(timeout=60)
            generation = system.runtime.catalog.serving(AUDIT_LOG)
            assert generation is not None
            table = f"audit_log_g{generation.generation}"
            with system.runtime.engine.begin() as conn:  # as version 1 made them
                conn.execute(text(f"DROP INDEX {table}_read_order"))
                conn.execute(text(f"ALTER TABLE {table} DROP COLUMN tx_id"))
                conn.execute(
                    text("UPDATE projection_generations SET version = 1 WHERE name = :name"),
                    {"name": AUDIT_LOG},
                )
        with TestClient(create_app(settings)) as client:
            client.headers.update(bearer(issue_key(store_url, Role.admin)))

            response = client.get("/audit")

            problem = assert_problem(response, 503, "read-model-upgrading")
            assert "version 2 is rebuilding it" in problem["detail"]
            assert response.headers["retry-after"] == "5"
