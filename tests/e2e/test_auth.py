"""API keys over the wire: keys made and revoked with the CLI while the server runs."""

from __future__ import annotations

import threading
import time

from api.key_store import DEFAULT_CACHE_TTL
from tests.support.http import assert_problem, order_body
from tests.support.processes import Deployment
from tests.support.waiting import WAIT_TIMEOUT


class TestRolesOverTheWire:
    """Who may do what, as the running server decides it."""

    def test_keys_decide_access_and_a_revoked_key_is_refused_within_the_bound(
        self, deployment: Deployment
    ) -> None:
        """No or unknown key: 401 with a Bearer challenge. Reader: reads, commands 403.
        Writer: commands, admin routes 403. `keys revoke` in another process: refused by the
        running server within the documented bound."""
        server = deployment.serve()
        reader = server.issue_key("reader", "e2e-reader")["token"]
        writer = server.issue_key("writer", "e2e-writer")["token"]
        with server.anonymous() as http:
            refused = http.get("/orders")
            assert_problem(refused, 401)
            assert refused.headers["WWW-Authenticate"].startswith("Bearer")
            wrong = http.get("/orders", headers={"Authorization": "Bearer olk_nope_nope"})
            assert_problem(wrong, 401)
            assert http.get("/healthz").status_code == 200
        with server.client(writer) as http:
            placed = http.post("/orders", json=order_body())
            assert placed.status_code == 201, placed.text
            assert_problem(http.post("/projections/order_summaries/rebuild"), 403)
        order_id = placed.json()["order_id"]
        with server.client(reader) as http:
            assert http.get(f"/orders/{order_id}/history").status_code == 200
            assert_problem(http.post("/orders", json=order_body()), 403)
            payment = {"amount": 1, "payment_reference": "p"}
            assert_problem(http.post(f"/orders/{order_id}/payments", json=payment), 403)

        # Revoked with the CLI while the key is in constant use: every request the key starts
        # once the bound has passed after the revocation is refused.
        key = server.issue_key("writer", "to-revoke")
        revoked_by: list[float] = []
        failures: list[Exception] = []

        def revoke() -> None:
            try:
                deployment.run("keys", "revoke", key["key_id"])
            except Exception as failure:  # raised again by the loop below, in the test thread
                failures.append(failure)
            revoked_by.append(time.monotonic())

        answers: list[tuple[float, int]] = []
        revoker = threading.Thread(target=revoke)
        with server.client(key["token"]) as http:
            assert http.get("/orders", params={"limit": 1}).status_code == 200
            revoker.start()

            # Keep the key hot, so any cache of good keys holds it throughout, until a few
            # requests have started after the bound (however slow a loaded machine answers).
            def after_the_bound() -> int:
                bound = revoked_by[0] + DEFAULT_CACHE_TTL if revoked_by else float("inf")
                return sum(1 for started, _ in answers if started > bound)

            give_up = time.monotonic() + DEFAULT_CACHE_TTL + WAIT_TIMEOUT
            while after_the_bound() < 3:
                started = time.monotonic()
                answers.append((started, http.get("/orders", params={"limit": 1}).status_code))
                assert not failures, failures[0]
                assert started < give_up, "the revocation never finished"
            revoker.join()
            last = http.get("/orders", params={"limit": 1})
        deadline = revoked_by[0] + DEFAULT_CACHE_TTL
        late = [status for started, status in answers if started > deadline]
        assert late, "no request was made after the bound"
        assert set(late) == {401}, f"accepted after the bound: {late.count(200)} of {len(late)}"
        assert {status for _, status in answers} == {200, 401}
        assert_problem(last, 401)
        assert last.headers["WWW-Authenticate"].startswith("Bearer")
