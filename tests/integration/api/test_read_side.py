"""The read side over HTTP: read-your-writes, orders, customers and reports against the commands."""

from __future__ import annotations

import base64
import itertools
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.http.app import create_app
from api.settings import Settings
from tests.support.auth import bearer, issue_key
from tests.support.http import assert_problem, order_body

LONG_WAIT = 60.0
"""Read-your-writes bound for the embedded worker on a busy machine; a read answers sooner."""


def start(url: str, **settings: Any) -> TestClient:
    """A client on the app over ``url``; used as a context manager so the lifespan runs."""
    return TestClient(
        create_app(Settings(database_url=url, **settings)), headers=bearer(issue_key(url))
    )


@pytest.fixture
def reader(sqlite_url: str) -> Iterator[TestClient]:
    """The app on a SQLite file with its worker running in-process."""
    with start(sqlite_url, read_your_writes_timeout=LONG_WAIT) as client:
        yield client


@pytest.fixture
def idle(sqlite_url: str) -> Iterator[TestClient]:
    """The app on a SQLite file with no worker: read models move only when the test says."""
    with start(sqlite_url, run_projections=False, read_your_writes_timeout=0.3) as client:
        yield client


def catch_up(client: TestClient) -> None:
    """Apply every recorded event to every read model, as a worker process would."""
    client.app.state.projections.worker().run_until_caught_up(timeout=60)


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


# -- a shop that issues commands and knows what each should do to the read models ---------------


@dataclass
class Issued:
    """One accepted command, with what it changed."""

    order_id: str
    kind: str
    position: int
    amount: int = 0
    lines: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class ShopOrder:
    customer_id: str
    currency: str
    lines: dict[str, tuple[int, int]]
    version: int = 1


@dataclass
class Shop:
    """Sends commands over HTTP and derives the expected read-model figures from them."""

    client: TestClient
    orders: dict[str, ShopOrder] = field(default_factory=dict)
    issued: list[Issued] = field(default_factory=list)

    @property
    def position(self) -> int:
        return self.issued[-1].position

    def place(self, customer_id: str, currency: str, lines: dict[str, tuple[int, int]]) -> str:
        body = order_body(
            customer_id=customer_id,
            currency=currency,
            lines=[{"sku": s, "quantity": q, "unit_price": p} for s, (q, p) in lines.items()],
        )
        response = self.client.post("/orders", json=body)
        assert response.status_code == 201, response.text
        order_id = str(response.json()["order_id"])
        self.orders[order_id] = ShopOrder(customer_id, currency, dict(lines))
        self.issued.append(Issued(order_id, "placed", response.json()["position"], 0, lines))
        return order_id

    def _send(self, order_id: str, kind: str, path: str, body: Any, **kw: Any) -> int:
        response = self.client.post(f"/orders/{order_id}{path}", json=body)
        position = int(ok(response)["position"])
        self.orders[order_id].version += 1
        self.issued.append(Issued(order_id, kind, position, **kw))
        return position

    def add_line(self, order_id: str, sku: str, quantity: int, price: int) -> int:
        self.orders[order_id].lines[sku] = (quantity, price)
        body = {"sku": sku, "quantity": quantity, "unit_price": price}
        return self._send(order_id, "line_added", "/lines", body, lines={sku: (quantity, price)})

    def remove_line(self, order_id: str, sku: str) -> int:
        removed = self.orders[order_id].lines.pop(sku)
        response = self.client.delete(f"/orders/{order_id}/lines/{sku}")
        position = int(ok(response)["position"])
        self.orders[order_id].version += 1
        self.issued.append(Issued(order_id, "line_removed", position, lines={sku: removed}))
        return position

    def pay(self, order_id: str, amount: int) -> int:
        body = {"amount": amount, "payment_reference": f"psp-{len(self.issued)}"}
        return self._send(order_id, "paid", "/payments", body, amount=amount)

    def ship(self, order_id: str) -> int:
        body = {"carrier": "DHL", "tracking_number": f"T{len(self.issued)}"}
        return self._send(order_id, "shipped", "/shipment", body)

    def deliver(self, order_id: str) -> int:
        return self._send(order_id, "delivered", "/delivery", None)

    def cancel(self, order_id: str) -> int:
        lines = dict(self.orders[order_id].lines)
        body = {"reason": "changed mind"}
        return self._send(order_id, "cancelled", "/cancellation", body, lines=lines)

    def refund(self, order_id: str, amount: int) -> int:
        body = {"amount": amount, "reason": "returned"}
        return self._send(order_id, "refunded", "/refunds", body, amount=amount)

    # -- what the read models should say ----------------------------------------------------

    def timestamps(self) -> dict[int, datetime]:
        """When each recorded event happened, by position, from the orders' audit history."""
        stamps: dict[int, datetime] = {}
        for order_id in self.orders:
            for event in ok(self.client.get(f"/orders/{order_id}/history"))["events"]:
                stamps[event["position"]] = moment(event["timestamp"])
        return stamps

    def expected_customer(self, customer_id: str) -> dict[str, Any]:
        stamps = self.timestamps()
        mine = [i for i in self.issued if self.orders[i.order_id].customer_id == customer_id]
        placed = [stamps[i.position] for i in mine if i.kind == "placed"]
        spend: dict[str, dict[str, int]] = {}
        for item in mine:
            row = spend.setdefault(
                self.orders[item.order_id].currency, {"captured": 0, "refunded": 0}
            )
            row["captured"] += item.amount if item.kind == "paid" else 0
            row["refunded"] += item.amount if item.kind == "refunded" else 0
        return {
            "customer_id": customer_id,
            "orders": len(placed),
            "first_order_at": min(placed),
            "last_order_at": max(placed),
            "spend": [
                {"currency": c, **row, "net": row["captured"] - row["refunded"]}
                for c, row in sorted(spend.items())
            ],
        }

    def expected_daily_sales(self) -> list[dict[str, Any]]:
        stamps = self.timestamps()
        keys = ("orders_placed", "gross", "captured", "refunded", "cancellations")
        days: dict[tuple[str, str], dict[str, int]] = {}
        for item in self.issued:
            if item.kind in ("shipped", "delivered"):
                continue
            day = stamps[item.position].date().isoformat()
            row = days.setdefault(
                (day, self.orders[item.order_id].currency), dict.fromkeys(keys, 0)
            )
            value = sum(q * p for q, p in item.lines.values())
            row["orders_placed"] += item.kind == "placed"
            row["gross"] += value if item.kind in ("placed", "line_added") else 0
            row["gross"] -= value if item.kind == "line_removed" else 0
            row["captured"] += item.amount if item.kind == "paid" else 0
            row["refunded"] += item.amount if item.kind == "refunded" else 0
            row["cancellations"] += item.kind == "cancelled"
        return [
            {"day": day, "currency": c, **row, "net": row["captured"] - row["refunded"]}
            for (day, c), row in sorted(days.items())
        ]

    def expected_sku_sales(self) -> list[dict[str, Any]]:
        skus: dict[tuple[str, str], dict[str, int]] = defaultdict(
            lambda: {"units_ordered": 0, "units_cancelled": 0, "revenue": 0}
        )
        signs = {"placed": (1, 0), "line_added": (1, 0), "line_removed": (-1, 0)}
        for item in self.issued:
            for sku, (quantity, price) in item.lines.items():
                row = skus[sku, self.orders[item.order_id].currency]
                ordered, cancelled = signs.get(item.kind, (0, 1))
                row["units_ordered"] += ordered * quantity
                row["units_cancelled"] += cancelled * quantity
                row["revenue"] += (ordered - cancelled) * quantity * price
        rows = [
            {
                "sku": s,
                "currency": c,
                **row,
                "net_units": row["units_ordered"] - row["units_cancelled"],
            }
            for (s, c), row in skus.items()
        ]
        return sorted(rows, key=lambda r: (-r["net_units"], r["sku"], r["currency"]))


def run_mixed_scenario(shop: Shop) -> dict[str, str]:
    """Orders in two currencies for three customers through every kind of command."""
    delivered = shop.place("ana", "EUR", {"A": (2, 1250), "B": (1, 500)})
    shop.pay(delivered, 3000)
    shop.ship(delivered)
    shop.deliver(delivered)
    shop.refund(delivered, 500)
    partly_paid = shop.place("ana", "USD", {"A": (1, 1000)})
    shop.pay(partly_paid, 400)
    edited = shop.place("bo", "EUR", {"B": (3, 500), "C": (1, 200)})
    shop.add_line(edited, "D", 2, 50)
    shop.remove_line(edited, "C")
    shop.cancel(edited)
    refunded = shop.place("bo", "EUR", {"A": (5, 1250)})
    shop.pay(refunded, 6250)
    shop.cancel(refunded)
    shop.refund(refunded, 6250)
    shop.place("cy", "EUR", {"C": (10, 200)})
    paid = shop.place("cy", "USD", {"D": (4, 75), "B": (1, 300)})
    shop.pay(paid, 600)
    return {"delivered": delivered, "partly_paid": partly_paid, "edited": edited}


def public_customer(body: dict[str, Any]) -> dict[str, Any]:
    return {
        **body,
        "first_order_at": moment(body["first_order_at"]),
        "last_order_at": moment(body["last_order_at"]),
    }


def report_days(shop: Shop) -> dict[str, str]:
    days = [stamp.date() for stamp in shop.timestamps().values()]
    return {"from": min(days).isoformat(), "to": max(days).isoformat()}


# -- read-your-writes ---------------------------------------------------------------------------


class TestReadYourWrites:
    """A read carrying a command's position reflects that command, or says it cannot yet."""

    def test_every_read_route_reflects_a_write_at_its_position(self, reader: TestClient) -> None:
        """Right after each command, reads with its position show what it did."""
        shop = Shop(reader)
        order_id = shop.place("rw-cust", "EUR", {"RW-1": (3, 700)})
        at = {"min_position": shop.position}

        summary = ok(reader.get(f"/orders/{order_id}", params=at))
        assert (summary["version"], summary["total"], summary["status"]) == (
            1,
            2100,
            "pending_payment",
        )
        listed = ok(reader.get("/orders", params={**at, "customer_id": "rw-cust"}))["data"]
        assert [o["order_id"] for o in listed] == [order_id]
        customer = ok(reader.get("/customers/rw-cust", params=at))
        assert customer["orders"] == 1
        top = ok(reader.get("/reports/top-skus", params=at))["data"]
        assert [(r["sku"], r["net_units"]) for r in top] == [("RW-1", 3)]
        days = ok(reader.get("/reports/daily-sales", params={**at, **report_days(shop)}))
        assert [(r["orders_placed"], r["gross"]) for r in days["data"]] == [(1, 2100)]

        shop.pay(order_id, 2100)
        at = {"min_position": shop.position}
        summary = ok(reader.get(f"/orders/{order_id}", params=at))
        assert (summary["version"], summary["captured"], summary["status"]) == (2, 2100, "paid")
        assert ok(reader.get("/customers/rw-cust", params=at))["spend"][0]["captured"] == 2100
        days = ok(reader.get("/reports/daily-sales", params={**at, **report_days(shop)}))
        assert sum(r["captured"] for r in days["data"]) == 2100

    def test_the_min_position_header_works_like_the_query_parameter(
        self, reader: TestClient
    ) -> None:
        """Orderledger-Min-Position makes every read route wait for the command it names."""
        shop = Shop(reader)
        order_id = shop.place("hdr-cust", "USD", {"H-1": (1, 900)})
        shop.cancel(order_id)
        header = {"Orderledger-Min-Position": str(shop.position)}
        assert ok(reader.get(f"/orders/{order_id}", headers=header))["status"] == "cancelled"
        listed = ok(reader.get("/orders", params={"status": "cancelled"}, headers=header))
        assert [o["order_id"] for o in listed["data"]] == [order_id]
        assert ok(reader.get("/customers/hdr-cust", headers=header))["orders"] == 1
        top = ok(reader.get("/reports/top-skus", headers=header))["data"]
        assert [(r["sku"], r["units_cancelled"], r["net_units"]) for r in top] == [("H-1", 1, 0)]
        days = ok(reader.get("/reports/daily-sales", params=report_days(shop), headers=header))
        assert sum(r["cancellations"] for r in days["data"]) == 1

    def test_a_position_beyond_the_read_model_is_a_503_with_retry_after(
        self, idle: TestClient
    ) -> None:
        """With no worker running, waiting for a newer position gives up with 503."""
        shop = Shop(idle)
        shop.place("late", "EUR", {"L-1": (1, 100)})
        catch_up(idle)
        order_id = shop.place("late", "EUR", {"L-2": (1, 100)})
        days = report_days(shop)
        # Each read, and what it answers at the position the read model has reached.
        reads: list[tuple[str, dict[str, str], int]] = [
            (f"/orders/{order_id}", {}, 404),
            ("/orders", {}, 200),
            ("/customers/late", {}, 200),
            ("/reports/top-skus", {}, 200),
            ("/reports/daily-sales", days, 200),
        ]
        for path, params, stale in reads:
            response = idle.get(path, params={**params, "min_position": shop.position})
            problem = assert_problem(response, 503, "service-unavailable")
            assert response.headers["Retry-After"] == "1"
            assert str(shop.position) in problem["detail"]
            header = {"Orderledger-Min-Position": str(shop.position)}
            assert_problem(idle.get(path, params=params, headers=header), 503)
            reached = idle.get(path, params={**params, "min_position": shop.position - 1})
            assert reached.status_code == stale

    def test_without_min_position_a_stale_read_model_answers_what_it_has(
        self, idle: TestClient
    ) -> None:
        """Reads without a position never wait: the stale read model answers 200 or 404."""
        shop = Shop(idle)
        known = shop.place("stale", "EUR", {"S-1": (1, 100)})
        catch_up(idle)
        shop.pay(known, 100)
        unseen = shop.place("newcomer", "EUR", {"S-2": (1, 100)})

        assert ok(idle.get(f"/orders/{known}"))["captured"] == 0
        assert_problem(idle.get(f"/orders/{unseen}"), 404, "not-found")
        assert [o["order_id"] for o in ok(idle.get("/orders"))["data"]] == [known]
        assert ok(idle.get("/customers/stale"))["spend"][0]["captured"] == 0
        assert_problem(idle.get("/customers/newcomer"), 404, "not-found")
        assert [r["sku"] for r in ok(idle.get("/reports/top-skus"))["data"]] == ["S-1"]

    def test_a_read_model_no_worker_has_built_yet_is_a_503(self, idle: TestClient) -> None:
        """Before any worker ran, reads say the read model is not there yet."""
        order_id = idle.post("/orders", json=order_body()).json()["order_id"]
        for path in [f"/orders/{order_id}", "/orders", "/customers/cust-42", "/reports/top-skus"]:
            response = idle.get(path)
            problem = assert_problem(response, 503)
            assert "not been built" in problem["detail"]
            assert response.headers["Retry-After"] == "1"


# -- GET /orders and /orders/{id} ----------------------------------------------------------------


class TestOrderList:
    """Filters and keyset pagination over the orders read model."""

    def test_filters_select_by_customer_status_and_placed_days(self, reader: TestClient) -> None:
        """Each filter returns exactly the orders that match it."""
        shop = Shop(reader)
        ids = run_mixed_scenario(shop)
        at = {"min_position": shop.position}

        def listed(**filters: Any) -> set[str]:
            page = ok(reader.get("/orders", params={**at, **filters, "limit": 200}))
            return {o["order_id"] for o in page["data"]}

        by_customer = {
            c: {i for i, o in shop.orders.items() if o.customer_id == c}
            for c in ("ana", "bo", "cy")
        }
        for customer, expected in by_customer.items():
            assert listed(customer_id=customer) == expected
        assert listed(customer_id="nobody") == set()
        assert listed(status="delivered") == {ids["delivered"]}
        assert listed(status="partially_paid") == {ids["partly_paid"]}
        assert len(listed(status="cancelled")) == 2
        assert listed(status="cancelled", customer_id="ana") == set()

        placed_days = [
            moment(ok(reader.get(f"/orders/{i}"))["placed_at"]).date() for i in shop.orders
        ]
        first, last = min(placed_days), max(placed_days)
        assert listed(placed_from=first.isoformat(), placed_to=last.isoformat()) == set(shop.orders)
        assert listed(placed_to=(first - timedelta(days=1)).isoformat()) == set()
        assert listed(placed_from=(last + timedelta(days=1)).isoformat()) == set()
        assert listed(placed_from="0001-01-01", placed_to="9999-12-31") == set(shop.orders)

    def test_pages_cover_every_order_once_newest_first(self, reader: TestClient) -> None:
        """Following next through more than two pages yields each order once, in order."""
        shop = Shop(reader)
        for n in range(8):
            shop.place(f"pager-{n % 2}", "EUR", {"P": (1, 100 + n)})
        states = [ok(reader.get(f"/orders/{i}/state")) for i in shop.orders]
        expected = [
            s["order_id"]
            for s in sorted(
                states, key=lambda s: (moment(s["placed_at"]), s["order_id"]), reverse=True
            )
        ]

        seen: list[str] = []
        page = ok(reader.get("/orders", params={"limit": 3, "min_position": shop.position}))
        pages = 1
        while True:
            seen += [o["order_id"] for o in page["data"]]
            if page["next"] is None:
                assert page["next_cursor"] is None
                break
            assert "cursor=" in page["next"]
            page = ok(reader.get(page["next"]))
            pages += 1
        assert pages == 3
        assert seen == expected

    def test_pages_of_one_customer_keep_the_filter(self, reader: TestClient) -> None:
        """The next link carries the filters, and the cursor param pages the same way."""
        shop = Shop(reader)
        for n in range(6):
            shop.place(f"kept-{n % 2}", "EUR", {"K": (1, 100)})
        params = {"customer_id": "kept-0", "limit": 1, "min_position": shop.position}
        seen: list[str] = []
        cursor = None
        while True:
            page = ok(
                reader.get("/orders", params={**params, **({"cursor": cursor} if cursor else {})})
            )
            seen += [o["order_id"] for o in page["data"]]
            assert all(o["customer_id"] == "kept-0" for o in page["data"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert "customer_id=kept-0" in page["next"]
        assert sorted(seen) == sorted(
            i for i, o in shop.orders.items() if o.customer_id == "kept-0"
        )
        assert len(seen) == 3

    @pytest.mark.parametrize(
        "cursor",
        [
            "not a cursor",
            "!!!!",
            base64.urlsafe_b64encode(b"\xff\xfe").decode(),
            base64.urlsafe_b64encode(b"[1]").decode(),
            base64.urlsafe_b64encode(b'["yesterday", "x"]').decode(),
            base64.urlsafe_b64encode(b"42").decode(),
        ],
    )
    def test_an_invalid_cursor_is_a_422_problem(self, reader: TestClient, cursor: str) -> None:
        """A cursor this service did not issue is refused, not guessed at."""
        problem = assert_problem(reader.get("/orders", params={"cursor": cursor}), 422)
        assert "cursor" in problem["detail"]

    @pytest.mark.parametrize("limit", ["0", "-1", "201", "99999999999999999999", "ten"])
    def test_a_limit_out_of_bounds_is_a_422_problem(self, reader: TestClient, limit: str) -> None:
        """Pages hold 1 to 200 orders."""
        problem = assert_problem(
            reader.get("/orders", params={"limit": limit}), 422, "invalid-request"
        )
        assert problem["errors"][0]["loc"] == ["query", "limit"]


class TestOrderReads:
    """One order from the read model, with its version as entity tag."""

    def test_the_etag_is_the_version_and_if_none_match_gives_304(self, reader: TestClient) -> None:
        """A matching If-None-Match is 304; after another command the new version is served."""
        shop = Shop(reader)
        order_id = shop.place("etag", "EUR", {"E": (2, 300)})
        first = reader.get(f"/orders/{order_id}", params={"min_position": shop.position})
        assert ok(first)["version"] == 1
        assert first.headers["ETag"] == '"1"'

        unchanged = reader.get(f"/orders/{order_id}", headers={"If-None-Match": '"1"'})
        assert unchanged.status_code == 304
        assert unchanged.headers["ETag"] == '"1"'
        assert unchanged.content == b""
        listed = reader.get(f"/orders/{order_id}", headers={"If-None-Match": '"7", "1"'})
        assert listed.status_code == 304

        shop.pay(order_id, 600)
        changed = reader.get(
            f"/orders/{order_id}",
            params={"min_position": shop.position},
            headers={"If-None-Match": '"1"'},
        )
        assert (ok(changed)["version"], ok(changed)["captured"]) == (2, 600)
        assert changed.headers["ETag"] == '"2"'
        assert (
            reader.get(f"/orders/{order_id}", headers={"If-None-Match": '"2"'}).status_code == 304
        )

    def test_an_unknown_order_is_a_404_problem(self, reader: TestClient) -> None:
        """An id the read model has never seen is not found."""
        missing = "00000000-0000-4000-8000-000000000000"
        problem = assert_problem(reader.get(f"/orders/{missing}"), 404, "not-found")
        assert missing in problem["detail"]

    def test_the_summary_matches_the_order_state(self, reader: TestClient) -> None:
        """The read model's figures equal the aggregate's at the same version."""
        shop = Shop(reader)
        ids = run_mixed_scenario(shop)
        for order_id in ids.values():
            summary = ok(reader.get(f"/orders/{order_id}", params={"min_position": shop.position}))
            state = ok(reader.get(f"/orders/{order_id}/state"))
            for key in (
                "status",
                "customer_id",
                "currency",
                "lines",
                "total",
                "captured",
                "refunded",
                "refund_due",
                "balance_due",
                "version",
            ):
                assert summary[key] == state[key], key
            assert summary["version"] == shop.orders[order_id].version


# -- figures ------------------------------------------------------------------------------------


class TestFigures:
    """Customer stats and reports equal sums of the commands issued."""

    def test_customer_stats_equal_the_commands(self, reader: TestClient) -> None:
        """Order count, first and last order, and spend per currency for each customer."""
        shop = Shop(reader)
        run_mixed_scenario(shop)
        for customer in ("ana", "bo", "cy"):
            body = ok(reader.get(f"/customers/{customer}", params={"min_position": shop.position}))
            assert public_customer(body) == shop.expected_customer(customer)
        ana = ok(reader.get("/customers/ana"))["spend"]
        assert ana == [
            {"currency": "EUR", "captured": 3000, "refunded": 500, "net": 2500},
            {"currency": "USD", "captured": 400, "refunded": 0, "net": 400},
        ]

    def test_an_unknown_customer_is_a_404_problem(self, reader: TestClient) -> None:
        """A customer with no orders is not found."""
        problem = assert_problem(reader.get("/customers/ghost"), 404, "not-found")
        assert "ghost" in problem["detail"]

    def test_a_customer_id_with_a_slash_or_unicode_is_found(self, reader: TestClient) -> None:
        """Any id the domain accepts can be read back from its path."""
        shop = Shop(reader)
        for customer in ("org/team-7", "Zo\u00eb \U0001f9fe"):
            shop.place(customer, "EUR", {"U": (1, 100)})
            body = ok(reader.get(f"/customers/{customer}", params={"min_position": shop.position}))
            assert (body["customer_id"], body["orders"]) == (customer, 1)

    def test_daily_sales_equal_the_commands(self, reader: TestClient) -> None:
        """Every day and currency row, and the currency filter."""
        shop = Shop(reader)
        run_mixed_scenario(shop)
        params = {**report_days(shop), "min_position": shop.position}
        rows = ok(reader.get("/reports/daily-sales", params=params))["data"]
        expected = shop.expected_daily_sales()
        assert rows == expected
        usd = ok(reader.get("/reports/daily-sales", params={**params, "currency": "USD"}))["data"]
        assert usd == [r for r in expected if r["currency"] == "USD"]
        assert (
            ok(reader.get("/reports/daily-sales", params={**params, "currency": "JPY"}))["data"]
            == []
        )

    def test_daily_sales_outside_the_range_are_left_out(self, reader: TestClient) -> None:
        """Days before the first event hold nothing."""
        shop = Shop(reader)
        shop.place("early", "EUR", {"X": (1, 100)})
        first = date.fromisoformat(report_days(shop)["from"])
        before = {
            "from": (first - timedelta(days=366)).isoformat(),
            "to": (first - timedelta(days=1)).isoformat(),
        }
        assert (
            ok(
                reader.get("/reports/daily-sales", params={**before, "min_position": shop.position})
            )["data"]
            == []
        )

    def test_top_skus_equal_the_commands(self, reader: TestClient) -> None:
        """SKUs by net units, ties by SKU, with limit and currency filter."""
        shop = Shop(reader)
        run_mixed_scenario(shop)
        at = {"min_position": shop.position}
        expected = shop.expected_sku_sales()
        assert ok(reader.get("/reports/top-skus", params={**at, "limit": 100}))["data"] == expected
        assert (
            ok(reader.get("/reports/top-skus", params={**at, "limit": 2}))["data"] == expected[:2]
        )
        eur = [r for r in expected if r["currency"] == "EUR"]
        assert (
            ok(reader.get("/reports/top-skus", params={**at, "currency": "EUR"}))["data"]
            == eur[:10]
        )

    @pytest.mark.parametrize(
        ("params", "field_name"),
        [
            ({"from": "2025-02-01", "to": "2025-01-31"}, "to"),
            ({"from": "2024-01-01", "to": "2025-01-01"}, "to"),
            ({"from": "2025-01-01"}, "to"),
            ({"to": "2025-01-01"}, "from"),
            ({"from": "2025-01-01", "to": "2025-01-02", "currency": "eur"}, "currency"),
            ({"from": "2025-01-01", "to": "2025-01-02", "currency": "EURO"}, "currency"),
            ({"from": "2025-02-30", "to": "2025-03-01"}, "from"),
        ],
    )
    def test_a_bad_daily_sales_range_is_a_422_problem(
        self, reader: TestClient, params: dict[str, str], field_name: str
    ) -> None:
        """from after to, more than 366 days, missing days and bad currencies are refused."""
        problem = assert_problem(reader.get("/reports/daily-sales", params=params), 422)
        assert problem["errors"][0]["loc"] == ["query", field_name]

    def test_a_full_leap_year_is_one_report(self, reader: TestClient) -> None:
        """366 days is the longest range."""
        assert (
            ok(
                reader.get(
                    "/reports/daily-sales", params={"from": "2024-01-01", "to": "2024-12-31"}
                )
            )["data"]
            == []
        )

    @pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "101"}, {"currency": "usd"}])
    def test_bad_top_skus_parameters_are_a_422_problem(
        self, reader: TestClient, params: dict[str, str]
    ) -> None:
        """limit is 1 to 100; currency is three capital letters."""
        assert_problem(reader.get("/reports/top-skus", params=params), 422, "invalid-request")


# -- odd inputs -----------------------------------------------------------------------------------


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


ODD_VALUES = [
    "",
    " ",
    "-1",
    "0",
    "1e3",
    "NaN",
    "inf",
    "99999999999999999999999",
    str(2**63),
    "0x10",
    "2020-02-30",
    "0000-01-01",
    "0001-01-01",
    "9999-12-31",
    "10000-01-01",
    "2020-01-01T00:00:00Z",
    "\x00",
    "\x1b[31m",
    "\u00e9\u0301",
    "\U0001f600",
    "\u202e\u200b",
    "a" * 1000,
    "null",
    "[]",
    "' OR 1=1 --",
    _cursor(["2020-01-01T00:00:00+00:00", "\x00"]),
    _cursor(["9999-12-31T23:59:59-14:00", "z"]),
    _cursor(["0001-01-01T00:00:00+14:00", "a"]),
    _cursor(["2020-01-01T00:00:00", "naive"]),
    _cursor({"a": 1, "b": 2}),
]
READ_PARAMS: dict[str, list[str]] = {
    "/orders": ["customer_id", "status", "placed_from", "placed_to", "limit", "cursor"],
    "/orders/{order_id}": [],
    "/customers/{customer}": [],
    "/reports/daily-sales": ["from", "to", "currency"],
    "/reports/top-skus": ["limit", "currency"],
    "/projections": [],
    "/projections/order_summaries": [],
}
# Percent-encoded bytes that are not UTF-8 (a lone surrogate, a stray byte), sent as they are.
ODD_ENCODED = ["%ED%B3%BF", "%FF", "%C3", "%00"]
ODD_SEGMENTS = ["%00", "%20", "..", "%F0%9F%98%80", "%FF", "a" * 1000, "%E2%80%AE", "x%2Fy"]
ODD_POSITIONS = ["-1", "", "1.5", "abc", "99999999999999999999999", "\u0661"]


def assert_no_server_error(response: httpx.Response) -> None:
    """Below 500, and any error is a problem document with the same status."""
    assert response.status_code < 500, (response.request.url, response.text)
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == response.status_code
        assert response.json()["detail"]


def odd_reads(client: TestClient) -> None:
    """Send every odd value as every parameter, path segment and position of every read route."""
    order_id = client.post("/orders", json=order_body()).json()["order_id"]
    valid = {"from": "2025-01-01", "to": "2025-01-31"}
    for template, names in READ_PARAMS.items():
        path = template.format(order_id=order_id, customer="cust-42")
        base = valid if "daily-sales" in path else {}
        for name, value in itertools.product(names, ODD_VALUES):
            assert_no_server_error(client.get(path, params={**base, name: value}))
        for name, raw in itertools.product(names, ODD_ENCODED):
            query = "&".join([*(f"{k}={v}" for k, v in base.items() if k != name), f"{name}={raw}"])
            assert_no_server_error(client.get(f"{path}?{query}"))
        for value in ODD_POSITIONS:
            assert_no_server_error(client.get(path, params={**base, "min_position": value}))
            header = {"Orderledger-Min-Position": value.encode()}
            assert_no_server_error(client.get(path, params=base, headers=header))
    for segment in ODD_SEGMENTS:
        for path in (f"/orders/{segment}", f"/customers/{segment}", f"/projections/{segment}"):
            assert_no_server_error(client.get(path))
        assert_no_server_error(client.post(f"/projections/{segment}/rebuild"))
    for value in ODD_VALUES:
        params = {"restart": value}
        assert_no_server_error(client.post("/projections/order_summaries/rebuild", params=params))


class TestOddQueries:
    """Whatever a client puts in a read, the answer is a success or a problem, never a 500."""

    def test_a_position_beyond_the_newest_event_is_refused_without_waiting(
        self, idle: TestClient
    ) -> None:
        """No command returned such a position, so waiting for it could only end in a 503."""
        catch_up(idle)
        response = idle.get("/orders", params={"min_position": str(2**63 - 1)})
        problem = assert_problem(response, 422, "invalid-request")
        assert problem["errors"][0]["field"] == "query.min_position"


# -- PostgreSQL and SQLite ----------------------------------------------------------------------


class TestOnEveryStore:
    """The read side answers the same on SQLite and PostgreSQL."""

    def test_reads_reflect_the_commands(self, store_url: str) -> None:
        """Orders, customers and reports after a mixed scenario, read at its position."""
        with start(store_url, read_your_writes_timeout=LONG_WAIT) as client:
            shop = Shop(client)
            ids = run_mixed_scenario(shop)
            at = {"min_position": shop.position}
            summary = ok(client.get(f"/orders/{ids['edited']}", params=at))
            assert (summary["status"], summary["version"]) == ("cancelled", 4)
            page = ok(client.get("/orders", params={**at, "limit": 4}))
            rest = ok(client.get(page["next"]))
            assert {o["order_id"] for o in page["data"] + rest["data"]} == set(shop.orders)
            for customer in ("ana", "bo", "cy"):
                body = ok(client.get(f"/customers/{customer}", params=at))
                assert public_customer(body) == shop.expected_customer(customer)
            days = ok(client.get("/reports/daily-sales", params={**at, **report_days(shop)}))
            assert days["data"] == shop.expected_daily_sales()
            top = ok(client.get("/reports/top-skus", params={**at, "limit": 100}))
            assert top["data"] == shop.expected_sku_sales()

    def test_odd_parameters_on_every_read_route_never_cause_a_server_error(
        self, store_url: str
    ) -> None:
        """Huge, negative, malformed and unicode values everywhere answer below 500."""
        with start(store_url, read_your_writes_timeout=0.05) as client:
            odd_reads(client)


class TestOpenAPI:
    """The read routes document their models and problem responses."""

    def test_read_routes_declare_problem_responses_and_response_models(
        self, reader: TestClient
    ) -> None:
        """Each read route names its response model and its problem+json statuses."""
        paths = ok(reader.get("/openapi.json"))["paths"]
        expected = {
            "/customers/{customer_id}": ("CustomerStatsPublic", ["404", "422", "503"]),
            "/reports/daily-sales": ("DailySalesPublic", ["422", "503"]),
            "/reports/top-skus": ("TopSkusPublic", ["422", "503"]),
            "/orders": ("OrderSummariesPublic", ["422", "503"]),
        }
        for path, (model, statuses) in expected.items():
            responses = paths[path]["get"]["responses"]
            schema = responses["200"]["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith(f"/{model}")
            for status in statuses:
                assert "application/problem+json" in responses[status]["content"], (path, status)
            assert paths[path]["get"]["description"]
