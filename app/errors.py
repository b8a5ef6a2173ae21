"""Every error the service returns: one enum, one exception, one status table, one JSON shape."""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ErrorType(StrEnum):
    validation_error = "validation_error"
    payload_too_large = "payload_too_large"
    overloaded = "overloaded"
    not_ready = "not_ready"
    not_found = "not_found"
    method_not_allowed = "method_not_allowed"
    unauthorized = "unauthorized"
    timeout = "timeout"
    client_closed = "client_closed"
    backend_error = "backend_error"
    internal_error = "internal_error"


STATUS: dict[ErrorType, int] = {
    ErrorType.validation_error: 422,
    ErrorType.payload_too_large: 413,
    ErrorType.overloaded: 429,
    ErrorType.not_ready: 503,
    ErrorType.not_found: 404,
    ErrorType.method_not_allowed: 405,
    ErrorType.unauthorized: 401,
    ErrorType.timeout: 504,
    ErrorType.client_closed: 499,
    ErrorType.backend_error: 500,
    ErrorType.internal_error: 500,
}


class ServiceError(Exception):
    """Raised anywhere below the routes; rendered by the one handler as `{"error": {...}}`."""

    def __init__(
        self,
        type: ErrorType,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.param = param
        self.headers = headers or {}

    @property
    def status_code(self) -> int:
        return STATUS[self.type]

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type.value, "message": self.message, "param": self.param}}


def _loc_to_param(loc: tuple[int | str, ...]) -> str | None:
    """('body', 'items', 3, 'response') -> 'items[3].response'."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith("function-") and "[" not in str(part):
            out += f".{part}" if out else str(part)
    return out or None


def render(error: ServiceError, request: Request | None = None) -> JSONResponse:
    metrics = getattr(request.app.state, "metrics", None) if request is not None else None
    if metrics is not None:
        metrics.errors.labels(error.type.value).inc()
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Routes hold no try/except: everything that escapes them lands here."""

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        return render(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _loc_to_param(tuple(first.get("loc", ())))
        message = str(first.get("msg", "invalid request"))
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error(s))"
        return render(ServiceError(ErrorType.validation_error, message, param), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        by_status = {v: k for k, v in STATUS.items() if k is not ErrorType.internal_error}
        kind = by_status.get(exc.status_code, ErrorType.validation_error)
        return render(ServiceError(kind, str(exc.detail), headers=dict(exc.headers or {})), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return render(ServiceError(ErrorType.internal_error, f"internal error: {type(exc).__name__}"), request)
