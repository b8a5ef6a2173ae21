"""Connection hygiene that uvicorn leaves out: a deadline for a request's headers (a connection that sends nothing, or
trickles its headers, is closed), caps on the headers' size and count (431), and a cap on open connections (a JSON
503, then closed), so that no client holds file descriptors or memory without sending a request. It extends uvicorn's
httptools protocol, the one its `auto` picks: `reward-server serve` uses it, and plain uvicorn takes it with
`--http app.server.protocol:GuardedHttpTools` (settings from `REWARD_*`)."""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.server.errors import ErrorType, ServiceError
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)


class GuardedHttpTools(HttpToolsProtocol):
    settings: ClassVar[Settings | None] = None  # None: read from the environment (`get_settings`)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = type(self).settings or get_settings()
        self.header_timer: asyncio.TimerHandle | None = None
        self.awaiting_headers = True
        self.header_bytes = 0  # of the request being read, as parsed (line and headers)
        self.header_count = 0
        self.raw_bytes = 0  # received since the request began, before its headers completed
        self.oversized: str | None = None

    @classmethod
    def bound_to(cls, settings: Settings) -> type[GuardedHttpTools]:
        """This protocol with `settings`' limits, for a server built from a Settings object."""
        return type(cls.__name__, (cls,), {"settings": settings})

    # ---- connection ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.refuse(
                ErrorType.too_many_connections,
                f"{self.limits.max_connections} connections are open (REWARD_MAX_CONNECTIONS); retry later",
                retry_after=self.limits.retry_after_seconds,
            )
            return
        self.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        super().connection_lost(exc)

    def arm(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.limits.header_timeout_s, self.headers_late)

    def disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def headers_late(self) -> None:
        self.header_timer = None
        if self.awaiting_headers and not self.transport.is_closing():
            self.refuse(
                ErrorType.request_timeout,
                f"the request headers did not arrive within {self.limits.header_timeout_s:g} s "
                "(REWARD_HEADER_TIMEOUT_S)",
            )

    def data_received(self, data: bytes) -> None:
        if self.awaiting_headers:
            self.raw_bytes += len(data)
            self.arm()  # the next request on a kept-alive connection: its headers have a deadline too
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.oversized is None and self.awaiting_headers and self.raw_bytes > self.limits.max_header_bytes:
            self.oversized = self.too_large()
        if self.oversized is not None:
            self.refuse(ErrorType.headers_too_large, self.oversized)

    # ---- parser callbacks ---------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.awaiting_headers, self.header_bytes, self.header_count = True, 0, 0
        self.arm()

    def on_url(self, url: bytes) -> None:
        self.header_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        self.header_count += 1
        if self.header_count > self.limits.max_headers:
            self.oversized = f"more than {self.limits.max_headers} request headers (REWARD_MAX_HEADERS)"
        elif self.header_bytes > self.limits.max_header_bytes:
            self.oversized = self.too_large()
        if self.oversized is None:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.awaiting_headers, self.raw_bytes = False, 0
        self.disarm()
        if self.oversized is None:  # else the request never reaches the app: `data_received` answers 431
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self.oversized is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.oversized is None:
            super().on_message_complete()

    # ---- refusals -----------------------------------------------------------------------------------
    def too_large(self) -> str:
        return f"the request headers exceed {self.limits.max_header_bytes} bytes (REWARD_MAX_HEADER_BYTES)"

    def refuse(self, kind: ErrorType, message: str, retry_after: int | None = None) -> None:
        """The service's JSON error (`ServiceError.body`), then the connection closes: nothing more is read."""
        error = ServiceError(kind, message)
        body = json.dumps(error.body()).encode()
        head = [
            f"HTTP/1.1 {error.status_code} {HTTPStatus(error.status_code).phrase}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            "connection: close",
        ]
        if retry_after is not None:
            head.append(f"retry-after: {retry_after}")
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        self.transport.close()
        self.disarm()
        log.warning("connection refused: %s", message)
