"""The depth-1 hand-off between the event loop, which plans, and the model thread, which runs plans.

The loop offers the next plan while the current one runs; until the thread takes it, the loop may take it back to
grow it with items that arrived since (`reclaim`), so a burst still lands in one plan. The lock guards the slot
only: nothing is planned while it is held.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")
_EMPTY = object()


class Handoff(Generic[T]):
    def __init__(self) -> None:
        self._slot: object = _EMPTY
        self._cond = threading.Condition()

    @property
    def holding(self) -> bool:
        return self._slot is not _EMPTY

    def offer(self, value: T) -> None:
        """Loop: the slot must be empty (`reclaim` first)."""
        with self._cond:
            assert self._slot is _EMPTY, "one plan waits at a time"
            self._slot = value
            self._cond.notify()

    def reclaim(self) -> T | None:
        """Loop: the waiting value, taken back (None if the thread took it, or none waits)."""
        with self._cond:
            value, self._slot = self._slot, _EMPTY
        return None if value is _EMPTY else value  # type: ignore[return-value]

    def take(self) -> T:
        """Model thread: blocks until a value is offered."""
        with self._cond:
            while self._slot is _EMPTY:
                self._cond.wait()
            value, self._slot = self._slot, _EMPTY
        return value  # type: ignore[return-value]
