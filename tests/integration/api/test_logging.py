"""Request ids and structured logs through the ASGI app: one JSON line per request."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import re
import sys
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.logs import REQUEST_ID_HEADER, JsonFormatter, logging_config
from tests.support.http import order_body

GENERATED_ID = re.compile(r"[0-9a-f]{32}")
REQUEST_FIELDS = {
    "ts",
    "level",
    "logger",
    "message",
    "pid",
    "request_id",
    "method",
    "route",
    "path",
    "status",
    "latency_ms",
    "client",
}


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The request log records captured so far, formatted as the JSON lines they become."""
    formatter = JsonFormatter()
    return [
        json.loads(formatter.format(record))
        for record in caplog.records
        if record.name == "orderledger.http"
    ]


class TestRequestIds:
    def test_a_sane_request_id_is_echoed(self, client: TestClient) -> None:
        """Letters, digits, dot, dash and underscore up to 128 characters come back as sent."""
        for sent in ("abc-123_x.y", "a" * 128):
            response = client.get("/healthz", headers={REQUEST_ID_HEADER: sent})
            assert response.headers[REQUEST_ID_HEADER] == sent

    def test_without_one_a_new_id_is_generated_per_request(self, client: TestClient) -> None:
        """Each request gets its own fresh id."""
        first = client.get("/healthz").headers[REQUEST_ID_HEADER]
        second = client.get("/healthz").headers[REQUEST_ID_HEADER]
        assert GENERATED_ID.fullmatch(first)
        assert GENERATED_ID.fullmatch(second)
        assert first != second

    @pytest.mark.parametrize(
        "insane", ["a" * 129, "has space", "semi;colon", "new\u00e9", 'quote"d', "a/b"]
    )
    def test_an_insane_request_id_is_replaced(self, client: TestClient, insane: str) -> None:
        """Too long or with other characters: a new id, never the client's text."""
        response = client.get("/healthz", headers={REQUEST_ID_HEADER: insane.encode()})
        echoed = response.headers[REQUEST_ID_HEADER]
        assert echoed != insane
        assert GENERATED_ID.fullmatch(echoed)

    def test_problem_responses_carry_the_id(self, client: TestClient) -> None:
        """401, 404 and 422 problems echo the id like any other response."""
        unauthenticated = client.get(
            "/projections", headers={"Authorization": "", REQUEST_ID_HEADER: "rid-401"}
        )
        assert unauthenticated.status_code == 401
        assert unauthenticated.headers[REQUEST_ID_HEADER] == "rid-401"
        missing = client.get(f"/orders/{uuid.uuid4()}/history", headers={REQUEST_ID_HEADER: "r4"})
        assert missing.status_code == 404
        assert missing.headers[REQUEST_ID_HEADER] == "r4"
        invalid = client.post("/orders", json={"nope": 1}, headers={REQUEST_ID_HEADER: "r422"})
        assert invalid.status_code == 422
        assert invalid.headers["content-type"] == "application/problem+json"
        assert invalid.headers[REQUEST_ID_HEADER] == "r422"


class TestRequestLog:
    def test_one_json_line_per_request_with_its_fields(
        self, client: TestClient, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Route template, path, status, latency, request id, key id and client are logged."""
        with caplog.at_level(logging.INFO, logger="orderledger.http"):
            placed = client.post("/orders", json=order_body(), headers={REQUEST_ID_HEADER: "r-1"})
            order_id = placed.json()["order_id"]
            client.get(f"/orders/{order_id}/history", headers={REQUEST_ID_HEADER: "r-2"})
        lines = request_lines(caplog)

        assert [line["request_id"] for line in lines] == ["r-1", "r-2"]
        first, second = lines
        assert REQUEST_FIELDS | {"key_id"} <= set(first)
        assert first["method"] == "POST"
        assert first["route"] == first["path"] == "/orders"
        assert first["status"] == 201
        assert first["level"] == "info"
        assert first["logger"] == "orderledger.http"
        assert first["client"] == "testclient"
        assert isinstance(first["latency_ms"], float)
        assert first["latency_ms"] > 0
        assert re.fullmatch(r"[0-9a-f]{16}", first["key_id"])
        assert second["route"] == "/orders/{order_id}/history"
        assert second["path"] == f"/orders/{order_id}/history"
        assert second["status"] == 200
        assert second["key_id"] == first["key_id"]

    def test_an_unauthenticated_request_is_logged_without_a_key(
        self, client: TestClient, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A 401 is still one line, with its status and no key id."""
        with caplog.at_level(logging.INFO, logger="orderledger.http"):
            client.get("/projections", headers={"Authorization": ""})
        [line] = request_lines(caplog)
        assert line["status"] == 401
        assert line["route"] == "/projections"
        assert "key_id" not in line
        assert set(line) >= REQUEST_FIELDS


class TestFormatter:
    def test_extras_and_exceptions_become_fields(self) -> None:
        """Fields passed with extra= and a traceback land in the JSON object."""
        record = logging.makeLogRecord(
            {"name": "orderledger.effects", "levelname": "ERROR", "msg": "failed %s"}
        )
        record.args = ("x",)
        record.effect_id = "e-1"
        try:
            raise ValueError("boom")
        except ValueError:
            record.exc_info = sys.exc_info()
        line = json.loads(JsonFormatter().format(record))
        assert line["message"] == "failed x"
        assert line["effect_id"] == "e-1"
        assert line["level"] == "error"
        assert "ValueError: boom" in line["exception"]

    @pytest.mark.parametrize("log_format", ["json", "text"])
    def test_the_config_sends_uvicorn_errors_through_one_format_and_drops_access(
        self, log_format: str
    ) -> None:
        """uvicorn.error reaches the root handler in the chosen format; uvicorn.access is off."""
        stream = io.StringIO()
        root = logging.getLogger()
        saved_handlers, saved_level = root.handlers[:], root.level
        try:
            logging.config.dictConfig(logging_config(log_format, "info"))  # type: ignore[arg-type]
            [handler] = root.handlers
            assert isinstance(handler, logging.StreamHandler)
            handler.setStream(stream)
            logging.getLogger("uvicorn.error").info("Started server process")
            logging.getLogger("uvicorn.access").info("GET / 200")
        finally:
            root.handlers[:] = saved_handlers
            root.setLevel(saved_level)
        [line] = stream.getvalue().splitlines()
        if log_format == "json":
            assert json.loads(line)["logger"] == "uvicorn.error"
        else:
            assert "INFO uvicorn.error Started server process" in line
