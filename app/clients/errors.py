"""`RewardServerError`: every failure talking to the server, typed like the server's `{"error": {...}}` body."""

from __future__ import annotations

import httpx


class RewardServerError(Exception):
    """Any failure talking to the server, typed like the server's `{"error": {...}}` body.

    `status_code` is None when no HTTP response came back (`type` is then "connection_error" and the httpx
    exception is chained as `__cause__`). `body` is the raw response text, kept for debugging.
    """

    def __init__(
        self,
        status_code: int | None,
        type: str,
        message: str,
        param: str | None = None,
        body: str | None = None,
    ) -> None:
        super().__init__(f"[{status_code if status_code is not None else '-'}] {type}: {message}")
        self.status_code = status_code
        self.type = type
        self.message = message
        self.param = param
        self.body = body

    @classmethod
    def from_response(cls, response: httpx.Response) -> RewardServerError:
        text = response.text
        try:
            detail = response.json()["error"]
            return cls(response.status_code, str(detail["type"]), str(detail["message"]), detail.get("param"), text)
        except (ValueError, KeyError, TypeError):  # not our JSON shape: a proxy, or a wrong URL
            return cls(response.status_code, "http_error", text[:500] or response.reason_phrase, None, text)
