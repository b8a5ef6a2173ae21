"""One pure-ASGI middleware for what every request gets: a request id, its arrival time, the API key check and the
body size limit (both before the body is read), the body's timeout, total time, the access log line and the
per-route request counter. Pure ASGI (not BaseHTTPMiddleware) so streaming and disconnects pass through untouched."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.server import auth
from app.server.errors import ErrorType, ServiceError
from app.server.limits import body_too_large
from app.server.metrics import Metrics
from app.settings import Settings

log = logging.getLogger("app.access")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_ID_HEADER = b"x-request-id"


class _Refused(Exception):
    """Answered here, before the app: an unauthenticated request, or a body over the limit."""

    def __init__(self, error: ServiceError) -> None:
        self.error = error


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics, settings: Settings) -> None:
        self.app = app
        self.metrics = metrics
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(_ID_HEADER, b"").decode("latin-1")[:128] or uuid.uuid4().hex
        token = request_id.set(rid)
        began = time.perf_counter()
        scope.setdefault("state", {})["arrived"] = began  # a request's deadline counts from here
        status = {"code": 500}
        declared = headers.get(b"content-length")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                extra = [
                    (_ID_HEADER, rid.encode("latin-1")),
                    (b"x-total-time-ms", f"{(time.perf_counter() - began) * 1000:.1f}".encode()),
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            unauthorized = auth.refused(
                self.settings, scope.get("path", ""), headers.get(b"authorization", b"").decode("latin-1") or None
            )
            if unauthorized is not None:  # before the body is read: nothing of it is parsed for an unknown caller
                raise _Refused(unauthorized)
            refused = body_too_large(self.settings, int(declared)) if declared and declared.isdigit() else None
            if refused is not None:
                raise _Refused(refused)
            body = await self._read_body(receive) if scope.get("method") in ("POST", "PUT", "PATCH") else None
            if body is None:
                await self.app(scope, receive, send_with_id)
            else:
                await self.app(scope, _replay(body, receive), send_with_id)
        except _Refused as refusal:
            error = refusal.error
            self.metrics.errors.labels(error.type.value).inc()
            await _send_json(send_with_id, error.status_code, error.body(), error.headers)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, str(status["code"])).inc()
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - began)
            fields = {
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": status["code"],
                "duration_ms": round((time.perf_counter() - began) * 1000, 2),
            }
            log.info("%(method)s %(path)s %(status)s %(duration_ms)s ms", fields, extra=fields)
            request_id.reset(token)

    async def _read_body(self, receive: Receive) -> bytes:
        """The whole body, refusing (chunked) bodies over the limit as they arrive, and bodies that have not arrived
        within `body_timeout_s` (a client trickling its body holds neither a connection nor a shutdown longer)."""
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                return await self._receive_body(receive)
        except TimeoutError:
            error = ServiceError(
                ErrorType.request_timeout,
                f"the body did not arrive within {self.settings.body_timeout_s:g} s (REWARD_BODY_TIMEOUT_S)",
                headers={"Connection": "close"},
            )
            raise _Refused(error) from None

    async def _receive_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if (refused := body_too_large(self.settings, size)) is not None:
                raise _Refused(refused)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the buffered body to the app once, then pass through (so the app still sees the disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_json(send: Send, status: int, body: dict[str, Any], extra: dict[str, str]) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the request id of the request being served (never headers or keys)."""

    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id.get(),
        }
        data.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    json_lines = fmt == "json" or (fmt == "auto" and not handler.stream.isatty())
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
