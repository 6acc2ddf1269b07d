"""The operator console: server-rendered pages at /console behind the API's keys and roles.

An operator signs in with an API key; the session lives in a sealed HttpOnly, SameSite=Strict
cookie (api/http/console/session.py). Pages read through the same functions as the JSON routes
(the read models, the ledger's history, the projection status, the outbox, the audit log) and
every change is a form carrying the session's CSRF token. Pages work without JavaScript;
vendored htmx only refreshes the projections table. The Content-Security-Policy allows scripts
and styles from /console/static only, and Jinja2 escapes every value.
"""

from __future__ import annotations

from api.http.console.pages import STATIC, RefusedError, refused_page, router

__all__ = ["STATIC", "RefusedError", "refused_page", "router"]
