"""What the engine refuses or fails with. Typed, without status codes: the server maps each to one in its table."""

from __future__ import annotations


class EngineError(Exception):
    """`index`: the item the problem is with, in the order the engine was given them (the server names the field)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index


class NotReady(EngineError):
    """Starting up or shutting down: nothing is admitted."""


class Overloaded(EngineError):
    """The queue holds as many items as it may; the caller should retry later."""


class InputRejected(EngineError):
    """An item the model cannot score (e.g. no tokens)."""


class DeadlineExceeded(EngineError):
    """Not scored within the request's deadline; its items were dropped."""


class BackendFailed(EngineError):
    """The model failed on an item (alone, after its batch was split), or produced a non-finite reward."""
