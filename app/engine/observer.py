"""What the engine reports as it runs: the observer interface (the server's Prometheus metrics implement it) and
the in-process counters that benchmarks and tests read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


class EngineObserver:
    """What the engine reports as it runs; no-ops here. The server's Prometheus metrics override these."""

    def track_queue(self, depth: Callable[[], int]) -> None:
        """`depth()` gives the items waiting, whenever the observer wants to know."""

    def tokenized(self, seconds: float) -> None:
        """One request's items tokenized."""

    def started(self, queue_seconds: float) -> None:
        """One request's wait from admission to its first forward."""

    def dropped(self, items: int) -> None:
        """Queued items skipped unscored: their request was abandoned."""

    def batch(self, size: int, real: int, padded: int, seconds: float) -> None:
        """One forward; `real`/`padded`: the tokens it computed (a shared prompt counts once)."""


@dataclass
class WorkerStats:
    """In-process counters (benchmarks, tests); the observer sees the same events."""

    batches: int = 0
    items: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # the last 1,000

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0
