"""The console in tests: signing in as a role, and the CSRF token a page's forms carry."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from api.key_store import Role
from tests.support.auth import issue_key

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
HOSTILE_SKU = "<script>alert(1)</script>"
QUOTED_CUSTOMER = 'cust-"o\'brien"'


def sign_in(client: TestClient, database_url: str, role: Role) -> str:
    """Sign the client in with a new key of ``role``; returns the key."""
    token = issue_key(database_url, role, f"console {role}")
    signed = client.post("/console/sign-in", data={"api_key": token}, follow_redirects=False)
    assert signed.status_code == 303, signed.text
    return token


def csrf_of(client: TestClient, page: str = "/console/orders") -> str:
    """The CSRF token in the forms of a page, as a browser would submit it."""
    found = _CSRF.search(client.get(page).text)
    assert found is not None, f"no CSRF token on {page}"
    return found.group(1)
