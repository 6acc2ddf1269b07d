"""Orders driven through their whole lives over HTTP against a real `orderledger serve`."""

from __future__ import annotations

from tests.support.http import order_body
from tests.support.processes import Server
from tests.support.shop import MIN_POSITION, Shop

SHIP = ("POST", "/shipment", {"carrier": "DHL", "tracking_number": "JD0146000"})


class TestOrderLifecycleOverTheWire:
    """Every command is seen by the next read that asks for its position; lists page by keyset."""

    def test_orders_are_paid_shipped_delivered_refunded_and_cancelled(self, server: Server) -> None:
        """Each step's new state is read back at once through the read model and the audit;
        a cancelled order owes its refund until it is issued; `next` links list every order
        once, newest first."""
        with server.client() as http:
            shop = Shop(http)
            placed = http.post("/orders", json=order_body(customer_id="cust-life"))
            assert placed.status_code == 201, placed.text
            order_id = placed.json()["order_id"]
            assert placed.headers["Location"] == f"/orders/{order_id}"
            assert placed.headers["ETag"] == '"1"'
            shop.position = int(placed.headers["Orderledger-Position"])
            assert shop.read(f"/orders/{order_id}")["status"] == "pending_payment"

            # Each command, then a read at its position: the header form and the query form.
            steps = [
                ("/lines", {"sku": "SKU-3", "quantity": 3, "unit_price": 100}, "pending_payment"),
                ("/payments", {"amount": 1000, "payment_reference": "psp-1"}, "partially_paid"),
                ("/payments", {"amount": 2300, "payment_reference": "psp-2"}, "paid"),
            ]
            for version, (path, body, status) in enumerate(steps, start=2):
                assert shop.command(order_id, "POST", path, body)["version"] == version
                summary = shop.read(f"/orders/{order_id}")
                assert (summary["version"], summary["status"]) == (version, status)
                assert summary["total"] == 3300
            shop.command(order_id, *SHIP)
            by_query = http.get(f"/orders/{order_id}", params={"min_position": shop.position})
            assert by_query.json()["status"] == "shipped"
            shop.command(order_id, "POST", "/delivery")
            assert shop.read(f"/orders/{order_id}")["status"] == "delivered"
            refunded = shop.command(
                order_id, "POST", "/refunds", {"amount": 300, "reason": "one mug chipped"}
            )
            assert refunded["version"] == 7

            # The read model, its ETag and a conditional read.
            latest = http.get(f"/orders/{order_id}", headers={MIN_POSITION: str(shop.position)})
            assert latest.headers["ETag"] == '"7"'
            assert (latest.json()["captured"], latest.json()["refunded"]) == (3300, 300)
            unchanged = http.get(f"/orders/{order_id}", headers={"If-None-Match": '"7"'})
            assert (unchanged.status_code, unchanged.content) == (304, b"")
            assert unchanged.headers["ETag"] == '"7"'
            stale = http.get(f"/orders/{order_id}", headers={"If-None-Match": '"6"'})
            assert stale.status_code == 200

            # The audit: every event with its position, and the state as of an early version.
            history = http.get(f"/orders/{order_id}/history").json()["events"]
            assert [event["type"] for event in history] == [
                "OrderPlaced",
                "OrderLineAdded",
                "PaymentCaptured",
                "PaymentCaptured",
                "OrderShipped",
                "OrderDelivered",
                "RefundIssued",
            ]
            assert history[-1]["position"] == shop.position
            assert [event["version"] for event in history] == list(range(1, 8))
            as_placed = http.get(f"/orders/{order_id}/state", params={"version": 1}).json()
            assert (as_placed["status"], as_placed["total"]) == ("pending_payment", 3000)
            now = http.get(f"/orders/{order_id}/state").json()
            assert (now["status"], now["refunded"], now["version"]) == ("delivered", 300, 7)

            # The customer's read model counted it.
            customer = shop.read("/customers/cust-life")
            assert customer["orders"] == 1
            assert customer["spend"] == [
                {"currency": "EUR", "captured": 3300, "refunded": 300, "net": 3000}
            ]

            # Another order paid in part, then cancelled: a refund is due until it is given.
            cancelled_id = shop.place(customer_id="cust-cancel")
            payment = {"amount": 1000, "payment_reference": "p"}
            shop.command(cancelled_id, "POST", "/payments", payment)
            shop.command(cancelled_id, "POST", "/cancellation", {"reason": "changed my mind"})
            cancelled = shop.read(f"/orders/{cancelled_id}")
            assert (cancelled["status"], cancelled["refund_due"]) == ("cancelled", 1000)
            refund = {"amount": 1000, "reason": "cancelled"}
            shop.command(cancelled_id, "POST", "/refunds", refund)
            refunded = shop.read(f"/orders/{cancelled_id}")
            assert (refunded["refunded"], refunded["refund_due"]) == (1000, 0)
            shipping = http.post(f"/orders/{cancelled_id}/shipment", json=SHIP[2])
            assert shipping.status_code == 409, shipping.text

            # Seven more orders, listed in pages of three by following the `next` links.
            paged = [shop.place(customer_id="cust-pages") for _ in range(7)]
            page = shop.read("/orders", customer_id="cust-pages", limit=3)
            listed = [order["order_id"] for order in page["data"]]
            pages = 1
            while page["next"] is not None:
                assert page["next"].startswith(server.base_url)
                response = http.get(page["next"])
                assert response.status_code == 200, response.text
                page = response.json()
                listed += [order["order_id"] for order in page["data"]]
                pages += 1
            assert pages == 3
            assert listed == list(reversed(paged))
