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
    probes and the API docs are always open, `/metrics` unless `protect_metrics`. `/admin` takes only the admin
    keys, and without any it is off (403): loading models is never open."""
    if path == "/admin" or path.startswith("/admin/"):
        if not settings.admin_keys:
            return ServiceError(ErrorType.forbidden, "the admin API is off: set REWARD_ADMIN_KEYS to use it")
        keys = settings.admin_keys
    else:
        docs = path.startswith(f"{DOCS_ASSETS}/") and ".." not in path
        if not settings.api_keys or path in OPEN or (path == "/metrics" and not settings.protect_metrics) or docs:
            return None
        keys = settings.api_keys
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
        return None
    return ServiceError(
        ErrorType.unauthorized,
        f"a valid {'admin' if keys is settings.admin_keys else 'API'} key is required (Authorization: Bearer <key>)",
        headers={"WWW-Authenticate": "Bearer"},
    )
