"""The limits a request is held to once decoded: the body's bytes (before it is read), its item count (before anything
is converted or tokenized), /rank's matrix, and its deadline. Each refusal names the setting. Field sizes are checked
while the body is decoded (`app.server.decode`); the queue's capacity is the engine's admission."""

from __future__ import annotations

from collections.abc import Sequence

from app.server.errors import ErrorType, ServiceError
from app.settings import Settings


def body_too_large(settings: Settings, size: int) -> ServiceError | None:
    """The 413 for a body of `size` bytes (declared, or read so far), None while it is within the limit."""
    if size <= settings.max_body_bytes:
        return None
    return ServiceError(
        ErrorType.payload_too_large, f"request body over {settings.max_body_bytes} bytes (REWARD_MAX_BODY_BYTES)"
    )


def check_items(items: int, settings: Settings) -> None:
    """413 for too many items (a /compare pair counts as two). Field sizes were checked as the body was decoded
    (`app.server.decode`), before any of it was validated."""
    if items > settings.max_items_per_request:
        raise ServiceError(
            ErrorType.payload_too_large,
            f"{items} items to score in one request; the limit is {settings.max_items_per_request} "
            "(REWARD_MAX_ITEMS_PER_REQUEST): split it",
        )


def check_probabilities(groups: Sequence[int], settings: Settings) -> None:
    """/rank's matrix grows with the square of a group: 1,024 replies would answer 20 MB for an 8 KB request."""
    largest = max(groups, default=0)
    if largest > settings.max_probability_group:
        raise ServiceError(
            ErrorType.validation_error,
            f"probabilities for a group of {largest} responses; the matrix is given for groups of at most "
            f"{settings.max_probability_group} (REWARD_MAX_PROBABILITY_GROUP): ask without it, or split the group",
            param="probabilities",
        )


def deadline(header: str | None, settings: Settings) -> float:
    """Seconds a request may take from its arrival: the setting, or its own `X-Request-Timeout`, at most the bound
    (a client asking for longer gets the bound: it learns it from /info, or from the 504)."""
    if header is None:
        return min(settings.request_timeout_s, settings.max_request_timeout_s)
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
        "max_body_bytes",
        "max_text_chars",
        "max_messages",
        "max_probability_group",
        "request_timeout_s",
        "max_request_timeout_s",
    )
    return {name: getattr(settings, name) for name in names}
