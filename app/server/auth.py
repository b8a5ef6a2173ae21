"""API keys, checked before a request's body is read: an unauthenticated client gets 401 for the price of its
headers, whatever it sends after them."""

from __future__ import annotations

import hmac

from app.server.errors import ErrorType, ServiceError
from app.settings import Settings

OPEN = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
DOCS_ASSETS = "/docs/assets"  # the API pages' scripts and styles, open like the pages


def refused(settings: Settings, path: str, authorization: str | None) -> ServiceError | None:
    """The 401 for a request to `path` with this `Authorization` header, None when it may pass. No keys: all open;
    probes and the API docs are always open, `/metrics` unless `protect_metrics`."""
    if not settings.api_keys or path in OPEN or (path == "/metrics" and not settings.protect_metrics):
        return None
    if path.startswith(f"{DOCS_ASSETS}/") and ".." not in path:
        return None
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and any(hmac.compare_digest(given.encode(), k.encode()) for k in settings.api_keys):
        return None
    return ServiceError(
        ErrorType.unauthorized,
        "a valid API key is required (Authorization: Bearer <key>)",
        headers={"WWW-Authenticate": "Bearer"},
    )
