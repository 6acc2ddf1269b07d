"""Console sessions: the API key an operator signed in with, sealed in a cookie.

The cookie holds the key, its expiry and the session's CSRF token, encrypted and authenticated
with AES-GCM under a key derived (HKDF) from the master key, so every API process on every
machine reads the same cookies and nothing is stored server-side. Each request checks the key
again through the key store: a revoked key ends its sessions within the key cache time.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

COOKIE = "orderledger_console"
_NONCE = 12
_PURPOSE = b"orderledger console session v1"


@dataclass(frozen=True)
class Session:
    token: str
    csrf: str
    expires_at: float

    def csrf_matches(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode(), self.csrf.encode())


class Sessions:
    """Issues and opens session cookies."""

    def __init__(self, master_key: bytes, ttl: float) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_PURPOSE).derive(
            master_key
        )
        self._aead = AESGCM(key)
        self.ttl = ttl

    def issue(self, token: str) -> tuple[str, Session]:
        """A new session for the key: the cookie's value, and the session it holds."""
        session = Session(token, secrets.token_urlsafe(24), time.time() + self.ttl)
        document = json.dumps({"t": session.token, "c": session.csrf, "e": session.expires_at})
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, document.encode(), _PURPOSE)
        return base64.urlsafe_b64encode(nonce + sealed).decode(), session

    def open(self, value: str | None) -> Session | None:
        """The session in a cookie; None if absent, forged, altered or expired."""
        if not value or len(value) > 4096:
            return None
        try:
            blob = base64.urlsafe_b64decode(value.encode())
            document = json.loads(self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], _PURPOSE))
            session = Session(str(document["t"]), str(document["c"]), float(document["e"]))
        except (ValueError, TypeError, KeyError, InvalidTag):
            return None
        return session if session.expires_at > time.time() else None
