"""A client's view of the API over the wire: commands that remember their position, and reads
that ask for at least that position (read-your-writes)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.http import order_body

MIN_POSITION = "Orderledger-Min-Position"


class Shop:
    """Places and drives orders through one HTTP client, tracking the newest position seen."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        self.position = 0

    def place(self, **overrides: Any) -> str:
        """Place a valid order (see tests.support.http.order_body) and return its id."""
        response = self.http.post("/orders", json=order_body(**overrides))
        assert response.status_code == 201, response.text
        self._seen(response)
        return str(response.json()["order_id"])

    def command(
        self, order_id: str, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Send a command on an order; it must succeed. Returns the CommandAccepted body."""
        response = self.http.request(method, f"/orders/{order_id}{path}", json=body)
        assert response.status_code == 200, response.text
        self._seen(response)
        accepted: dict[str, Any] = response.json()
        return accepted

    def read(self, path: str, **params: Any) -> dict[str, Any]:
        """A read-model query that waits for this client's writes (the header form)."""
        response = self.http.get(path, params=params, headers={MIN_POSITION: str(self.position)})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def _seen(self, response: httpx.Response) -> None:
        position = int(response.headers["Orderledger-Position"])
        assert position == response.json()["position"]
        self.position = max(self.position, position)
