"""Every limit a request is held to, checked here and nowhere else: the body's bytes (before it is read), its fields'
characters and messages and its item count (before anything is tokenized), and its deadline. Each refusal names the
setting. (The queue's capacity is the engine's admission, not a per-request limit.)"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.server.errors import ErrorType, ServiceError
from app.server.schemas import Message
from app.settings import Settings


def body_too_large(settings: Settings, size: int) -> ServiceError | None:
    """The 413 for a body of `size` bytes (declared, or read so far), None while it is within the limit."""
    if size <= settings.max_body_bytes:
        return None
    return ServiceError(
        ErrorType.payload_too_large, f"request body over {settings.max_body_bytes} bytes (REWARD_MAX_BODY_BYTES)"
    )


def _not_unicode(text: str) -> bool:
    """JSON may escape a lone surrogate, which no tokenizer can read: the one kind of str that is not text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_request(body: BaseModel, items: int, settings: Settings) -> None:
    """Per-field limits depend on settings, so they cannot live in the field types; 422 naming the field, then 413
    for too many items (a /compare pair counts as two)."""
    max_chars, max_messages = settings.max_text_chars, settings.max_messages

    def walk(value: Any, where: str) -> None:
        if isinstance(value, str):
            if not value.isascii() and _not_unicode(value):
                raise ServiceError(
                    ErrorType.validation_error,
                    "not valid Unicode text: it holds a lone surrogate (an unpaired \\ud800-\\udfff escape)",
                    param=where,
                )
            if len(value) > max_chars:
                raise ServiceError(
                    ErrorType.validation_error,
                    f"{len(value)} characters; the limit is {max_chars} (REWARD_MAX_TEXT_CHARS)",
                    param=where,
                )
        elif isinstance(value, BaseModel):
            for name, child in value:
                walk(child, f"{where}.{name}" if where else name)
        elif isinstance(value, list):
            if value and isinstance(value[0], Message) and len(value) > max_messages:
                raise ServiceError(
                    ErrorType.validation_error,
                    f"{len(value)} messages; the limit is {max_messages} (REWARD_MAX_MESSAGES)",
                    param=where,
                )
            for i, child in enumerate(value):
                if isinstance(child, str | BaseModel):  # free-form fields (OpenRLHF labels) are not scored
                    walk(child, f"{where}[{i}]")

    walk(body, "")
    if items > settings.max_items_per_request:
        raise ServiceError(
            ErrorType.payload_too_large,
            f"{items} items to score in one request; the limit is {settings.max_items_per_request} "
            "(REWARD_MAX_ITEMS_PER_REQUEST): split it",
        )


def deadline(header: str | None, settings: Settings) -> float:
    """Seconds a request may wait for its rewards: the setting, or its own `X-Request-Timeout`, at most the bound
    (a client asking for longer gets the bound: it learns it from /info, or from the 504)."""
    if header is None:
        return settings.request_timeout_s
    try:
        value = float(header)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ServiceError(
            ErrorType.validation_error,
            f"X-Request-Timeout must be a positive number of seconds (at most {settings.max_request_timeout_s:g} "
            "count: REWARD_MAX_REQUEST_TIMEOUT_S)",
            param="X-Request-Timeout",
        )
    return min(value, settings.max_request_timeout_s)


def described(settings: Settings) -> dict[str, int | float]:
    """The limits as `/info` reports them, so that clients split and pace their calls by the real numbers."""
    names = (
        "max_items_per_request",
        "max_queue_items",
        "max_batch_tokens",
        "max_batch_size",
        "pad_to_multiple_of",
        "max_body_bytes",
        "max_text_chars",
        "max_messages",
        "request_timeout_s",
        "max_request_timeout_s",
    )
    return {name: getattr(settings, name) for name in names}
