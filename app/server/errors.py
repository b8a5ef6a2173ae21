"""Every error the service returns: one enum, one status table (with what each means, for the OpenAPI schema), one
exception, one JSON shape, one handler. The engine's typed exceptions are mapped here and nowhere else."""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine import errors as engine

log = logging.getLogger(__name__)


class ErrorType(StrEnum):
    validation_error = "validation_error"
    payload_too_large = "payload_too_large"
    overloaded = "overloaded"
    too_many_connections = "too_many_connections"
    not_ready = "not_ready"
    not_found = "not_found"
    model_not_found = "model_not_found"
    method_not_allowed = "method_not_allowed"
    unauthorized = "unauthorized"
    forbidden = "forbidden"
    conflict = "conflict"
    insufficient_memory = "insufficient_memory"
    timeout = "timeout"
    request_timeout = "request_timeout"
    headers_too_large = "headers_too_large"
    client_closed = "client_closed"
    backend_error = "backend_error"
    internal_error = "internal_error"


TABLE: dict[ErrorType, tuple[int, str]] = {
    ErrorType.validation_error: (422, "invalid input; `param` says where"),
    ErrorType.payload_too_large: (413, "too many items, or body too large"),
    ErrorType.overloaded: (429, "queue full; retry after `Retry-After` seconds"),
    ErrorType.too_many_connections: (503, "too many open connections; retry after `Retry-After` seconds"),
    ErrorType.not_ready: (503, "not ready (loading or shutting down); retry after `Retry-After` seconds"),
    ErrorType.not_found: (404, "no such route"),
    ErrorType.model_not_found: (404, "no such model; /v1/models lists those served"),
    ErrorType.method_not_allowed: (405, "the route does not take this method"),
    ErrorType.unauthorized: (401, "missing or wrong API key"),
    ErrorType.forbidden: (403, "the admin API is off (no REWARD_ADMIN_KEYS)"),
    ErrorType.conflict: (409, "the name is taken, or still used by an ensemble, alias or as the default"),
    ErrorType.insufficient_memory: (507, "not enough free memory to load the model beside those served"),
    ErrorType.timeout: (504, "not scored within the request's deadline"),
    ErrorType.request_timeout: (408, "the request's headers or body did not arrive in time"),
    ErrorType.headers_too_large: (431, "request headers too large or too many"),
    ErrorType.client_closed: (499, "the client closed the connection first"),
    ErrorType.backend_error: (500, "the model failed on this request's items"),
    ErrorType.internal_error: (500, "a bug: the service failed"),
}
STATUS: dict[ErrorType, int] = {kind: status for kind, (status, _) in TABLE.items()}
RETRY_LATER = frozenset({ErrorType.overloaded, ErrorType.not_ready})  # answered with `Retry-After`
FROM_ENGINE: dict[type[engine.EngineError], ErrorType] = {
    engine.NotReady: ErrorType.not_ready,
    engine.Overloaded: ErrorType.overloaded,
    engine.InputRejected: ErrorType.validation_error,
    engine.DeadlineExceeded: ErrorType.timeout,
    engine.BackendFailed: ErrorType.backend_error,
}


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def openapi_responses(*kinds: ErrorType) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can answer with these errors."""
    out: dict[int | str, dict[str, Any]] = {}
    for kind in kinds:
        status, text = TABLE[kind]
        previous = out.get(status, {}).get("description")
        out[status] = {"model": ErrorBody, "description": f"{previous}; {text}" if previous else text}
    return out


class ServiceError(Exception):
    """Raised by the HTTP layer (auth, limits, routes); rendered by the one handler as `{"error": {...}}`. The engine
    raises its own errors, mapped through `FROM_ENGINE`."""

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


def from_engine(exc: engine.EngineError, field: str) -> ServiceError:
    """An engine error in the client's terms: its status, and the item it names as the body's `field[index]`."""
    return ServiceError(FROM_ENGINE[type(exc)], exc.message, None if exc.index is None else f"{field}[{exc.index}]")


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
    headers = dict(error.headers)
    if request is not None:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.errors.labels(error.type.value).inc()
        if error.type in RETRY_LATER:
            headers.setdefault("Retry-After", str(request.app.state.settings.retry_after_seconds))
    return JSONResponse(error.body(), status_code=error.status_code, headers=headers)


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
        own = (ErrorType.internal_error, ErrorType.model_not_found, ErrorType.conflict)  # ours, never Starlette's
        by_status = {v: k for k, v in STATUS.items() if k not in own}
        kind = by_status.get(exc.status_code, ErrorType.validation_error)
        return render(ServiceError(kind, str(exc.detail), headers=dict(exc.headers or {})), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return render(ServiceError(ErrorType.internal_error, f"internal error: {type(exc).__name__}"), request)
