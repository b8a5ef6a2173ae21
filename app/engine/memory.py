"""Freed memory handed back to the system. glibc keeps what a large request freed (a 16 MB body decoded, a thousand
texts tokenized) in its heaps, and a server's RSS then only grows: the soak over hostile bodies ended 70% above its
start. `malloc_trim` returns the free pages; the model thread calls it when its queue has drained, at most once per
`interval`, so it never delays a batch under load. A no-op where the C library has no `malloc_trim` (musl, macOS)."""

from __future__ import annotations

import ctypes
import ctypes.util
import time


def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None  # the call releases the GIL (a plain CDLL)
    except (OSError, AttributeError):
        return None


class Trimmer:
    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._trim = _malloc_trim()
        self._last = 0.0

    def idle(self) -> None:
        """The queue drained: trim, unless that was done less than `interval` ago."""
        now = time.monotonic()
        if self._trim is not None and now - self._last >= self.interval:
            self._trim(0)
            self._last = time.monotonic()
