"""Senders deliver one effect: a signed webhook POST, or an email over SMTP.

A sender loads what it needs when it runs (the event, the order as of that event) from the
ledger; the outbox row carries only ids. Any exception or a non-2xx answer is a failed attempt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import smtplib
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any, Protocol
from uuid import UUID

import httpx

from domain.audit import metadata_of
from domain.ledger import HistoryEntry, OrderLedger
from domain.money import MINOR_UNITS
from domain.order import Order
from projections.effects.outbox import ERASED_REASON, email_address
from projections.effects.targets import TargetNotAllowedError, TargetPolicy

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret


@dataclass(frozen=True)
class Effect:
    """What a sender needs to know about one outbox row."""

    id: str
    effect: str
    kind: str
    position: int
    order_id: str
    order_version: int
    event_type: str
    occurred_at: float
    target: str
    attempt: int


@dataclass(frozen=True)
class Outcome:
    """How one delivery attempt went."""

    delivered: bool
    status_code: int | None = None
    error: str | None = None
    cancelled: bool = False
    """Nothing to deliver any more (the customer's personal data was erased): never retried."""


class Sender(Protocol):
    def send(self, effect: Effect) -> Outcome: ...


# -- Standard Webhooks signatures -----------------------------------------------------------------


def new_secret() -> str:
    """A fresh signing secret in the Standard Webhooks format (``whsec_`` + base64)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,`` + base64 HMAC-SHA256 of id.timestamp.body."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class InvalidSignatureError(ValueError):
    """The webhook's signature does not match its body under the secret."""


def verify(secret: str, headers: Mapping[str, str], body: bytes, *, tolerance: int = 300) -> None:
    """Check a received webhook as a receiver would (raises InvalidSignatureError)."""
    message_id = headers.get("webhook-id", "")
    raw_timestamp = headers.get("webhook-timestamp", "")
    if not message_id or not raw_timestamp.isdigit():
        raise InvalidSignatureError("missing webhook-id or webhook-timestamp")
    timestamp = int(raw_timestamp)
    if abs(time.time() - timestamp) > tolerance:
        raise InvalidSignatureError("timestamp outside the tolerance")
    expected = sign(secret, message_id, timestamp, body).removeprefix("v1,")
    # Space-separated "scheme,signature" pairs; only v1 (HMAC-SHA256) is ours to check.
    offered = [
        signature
        for scheme, _, signature in (
            part.partition(",") for part in headers.get("webhook-signature", "").split()
        )
        if scheme == "v1" and signature
    ]
    if not offered:
        raise InvalidSignatureError("no v1 signature in the webhook-signature header")
    if not any(hmac.compare_digest(expected, candidate) for candidate in offered):
        raise InvalidSignatureError("no signature matches")


# -- the event behind an effect -----------------------------------------------------------------


def event_entry(ledger: OrderLedger, effect: Effect) -> HistoryEntry | None:
    """The recorded event that caused the effect (None if the store no longer has it)."""
    history = ledger.store.select_aggregate_notifications(
        UUID(effect.order_id), lte_version=effect.order_version
    )
    return ledger.history_entry(history[-1]) if history else None


def traced(entry: HistoryEntry | None) -> dict[str, str]:
    """Headers naming the event and its conversation, so a receiver can trace it back."""
    metadata = entry.metadata if entry is not None else metadata_of(None)
    return {
        "orderledger-event-id": str(metadata["event_id"]),
        "correlation-id": str(metadata["correlation_id"]),
    }


# -- webhooks ---------------------------------------------------------------------------------


class WebhookSender:
    """POSTs ``{id, type, order_id, position, occurred_at, data}``, signed with the secret."""

    def __init__(
        self,
        ledger: OrderLedger,
        secrets_by_subscription: SecretSource,
        *,
        timeout: float,
        targets: TargetPolicy,
    ) -> None:
        self.ledger = ledger
        self.secrets = secrets_by_subscription
        self.targets = targets
        self.client = httpx.Client(timeout=timeout, follow_redirects=False)

    def body(self, effect: Effect, entry: HistoryEntry | None = None) -> bytes:
        entry = entry if entry is not None else event_entry(self.ledger, effect)
        data: dict[str, Any] = entry.data if entry is not None else {}
        document = {
            "id": effect.id,
            "type": effect.event_type,
            "order_id": effect.order_id,
            "position": effect.position,
            "occurred_at": _iso(effect.occurred_at),
            "data": data,
        }
        return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()

    def send(self, effect: Effect) -> Outcome:
        secret = self.secrets.secret_for(effect.effect.split(":", 1)[1])
        if secret is None:
            return Outcome(False, error="the subscription no longer exists")
        entry = event_entry(self.ledger, effect)
        body = self.body(effect, entry)
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": effect.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, effect.id, timestamp, body),
            "user-agent": "orderledger-webhooks",
            **traced(entry),
        }
        url = httpx.URL(effect.target)
        try:
            address = self.targets.resolve(url.host, url.port or _DEFAULT_PORTS[url.scheme])
        except TargetNotAllowedError:
            return Outcome(False, error="address not allowed")
        except OSError:
            return Outcome(False, error="name not resolved")
        # To the address just checked; the name stays in Host and, for TLS, in SNI and the
        # certificate check.
        headers["host"] = url.netloc.decode("ascii")
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        try:
            response = self.client.post(
                url.copy_with(host=str(address)),
                content=body,
                headers=headers,
                extensions=extensions,
            )
        except httpx.HTTPError as error:
            return Outcome(False, error=_http_failure(error))
        if 200 <= response.status_code < 300:
            return Outcome(True, status_code=response.status_code)
        return Outcome(
            False, status_code=response.status_code, error=f"HTTP {response.status_code}"
        )

    def close(self) -> None:
        self.client.close()


_DEFAULT_PORTS = {"http": 80, "https": 443}

# The class of failure an attempt records and shows over HTTP; never the socket's own text.
_HTTP_FAILURES: tuple[tuple[type[httpx.HTTPError], str], ...] = (
    (httpx.ConnectTimeout, "connect timeout"),
    (httpx.TimeoutException, "timeout"),
    (httpx.ConnectError, "connection failed"),
    (httpx.RemoteProtocolError, "connection closed or invalid response"),
    (httpx.TransportError, "transport error"),
)


def _http_failure(error: httpx.HTTPError) -> str:
    return next((name for kind, name in _HTTP_FAILURES if isinstance(error, kind)), "HTTP error")


class SecretSource(Protocol):
    def secret_for(self, subscription_id: str) -> str | None: ...


# -- email ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmtpSettings:
    host: str = "127.0.0.1"
    port: int = 25
    sender: str = "orders@orderledger.local"
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    timeout: float = 10.0


def format_amount(amount: int, currency: str) -> str:
    exponent = MINOR_UNITS.get(currency, 2)
    if exponent == 0:
        return f"{currency} {amount:,}"
    whole, fraction = divmod(amount, 10**exponent)
    return f"{currency} {whole:,}.{fraction:0{exponent}d}"


def render_email(effect: Effect, order: Order) -> tuple[str, str]:
    """Subject and plain-text body of the customer email for an event."""
    reference = order.client_reference or str(order.id)[:8]
    total = format_amount(order.total, order.currency)
    if effect.event_type == "OrderPlaced":
        lines = "\n".join(
            f"  {line.quantity} x {line.sku} at {format_amount(line.unit_price, order.currency)}"
            for line in order.lines.values()
        )
        return (
            f"Your order {reference} is placed",
            f"Thank you. Your order:\n{lines}\nTotal: {total}\n",
        )
    if effect.event_type == "OrderShipped":
        return (
            f"Your order {reference} has shipped",
            f"Your order is on its way with {order.carrier}, tracking number "
            f"{order.tracking_number}.\n",
        )
    refunded = format_amount(order.refunded, order.currency)
    return f"A refund for order {reference}", f"We have refunded you; {refunded} in all so far.\n"


class EmailSender:
    """Sends the customer email over SMTP; its Message-ID derives from the effect id."""

    def __init__(self, ledger: OrderLedger, settings: SmtpSettings) -> None:
        self.ledger = ledger
        self.settings = settings

    def message(self, effect: Effect) -> EmailMessage | None:
        """The email, to the address the order holds; None once that address was erased."""
        order = self.ledger.get_order(UUID(effect.order_id), version=effect.order_version)
        address = email_address(order.customer_email)
        if address is None:
            return None
        subject, text = render_email(effect, order)
        message = EmailMessage()
        message["From"] = self.settings.sender
        message["To"] = address
        message["Subject"] = subject
        message["Message-ID"] = f"<{effect.id}@orderledger>"
        message["X-Orderledger-Effect"] = effect.id
        message["Correlation-Id"] = traced(event_entry(self.ledger, effect))["correlation-id"]
        message.set_content(text)
        return message

    def send(self, effect: Effect) -> Outcome:
        try:
            message = self.message(effect)
            if message is None:
                return Outcome(False, error=ERASED_REASON, cancelled=True)
            with smtplib.SMTP(
                self.settings.host, self.settings.port, timeout=self.settings.timeout
            ) as smtp:
                if self.settings.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self.settings.username:
                    smtp.login(self.settings.username, self.settings.password or "")
                smtp.send_message(message)
        except (OSError, smtplib.SMTPException) as error:
            return Outcome(False, error=smtp_failure(error))
        return Outcome(True)

    def close(self) -> None:
        """Nothing is kept open between messages."""


def smtp_failure(error: OSError | smtplib.SMTPException) -> str:
    """What kind of SMTP failure happened, with the server's codes and never an address.

    The library's messages quote the recipients and the server's replies (which often repeat
    the address); attempts are stored, shown over HTTP and logged, so they keep neither.
    """
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        codes = sorted({str(code) for code, _ in error.recipients.values()})
        return f"SMTP recipient refused ({', '.join(codes)})"
    if isinstance(error, smtplib.SMTPSenderRefused):
        return f"SMTP sender refused ({error.smtp_code})"
    if isinstance(error, smtplib.SMTPResponseException):
        return f"SMTP error {error.smtp_code} ({type(error).__name__})"
    return type(error).__name__


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat()
