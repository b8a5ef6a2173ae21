"""The batching policy: which queued items go into the next forward pass. Pure Python, no torch, no asyncio.

Cost model: a padded batch costs `count x padded(longest)` tokens. The oldest item is always in the next batch (so
nothing starves); it is joined by items of similar length from a bounded look-ahead window, grown one neighbour at a
time in length order, while the batch stays under the token budget and the item cap and batching wastes little
padding. Items whose request was abandoned are dropped here, before they are computed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Schedulable(Protocol):
    @property
    def length(self) -> int: ...

    @property
    def abandoned(self) -> bool: ...


T = TypeVar("T", bound=Schedulable)


def padded(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple`."""
    return -(-length // multiple) * multiple


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch_tokens: int
    max_batch_size: int
    pad_to_multiple_of: int = 1
    min_padding_efficiency: float = 0.0  # sum(own padded length) / (count x longest), for every batch formed
    lookahead: int = 256


class TokenBudgetQueue(Generic[T]):
    """Not thread-safe: the worker guards it with its own lock."""

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._entries: deque[T] = deque()
        self.dropped = 0  # abandoned entries skipped so far

    def __len__(self) -> int:
        return len(self._entries)

    def extend(self, entries: Iterable[T]) -> None:
        self._entries.extend(entries)

    def next_batch(self) -> list[T]:
        """The next batch to run (empty when nothing is queued)."""
        p = self.policy
        window: list[T] = []
        while self._entries and len(window) < p.lookahead:
            entry = self._entries.popleft()
            if entry.abandoned:
                self.dropped += 1
            else:
                window.append(entry)
        if not window:
            return []

        own = [padded(e.length, p.pad_to_multiple_of) for e in window]
        order = sorted(range(len(window)), key=own.__getitem__)
        lo = hi = order.index(0)  # the oldest entry anchors the batch
        count, longest, own_sum = 1, own[0], own[0]

        def admits(n: int, top: int, total: int) -> bool:
            cost = n * top
            return n <= p.max_batch_size and cost <= p.max_batch_tokens and total >= p.min_padding_efficiency * cost

        while True:
            options: list[tuple[int, str]] = []  # (padding this step adds, side)
            if lo > 0:
                i = order[lo - 1]
                if admits(count + 1, longest, own_sum + own[i]):
                    options.append((longest - own[i], "lo"))
            if hi < len(order) - 1:
                i = order[hi + 1]
                if admits(count + 1, own[i], own_sum + own[i]):
                    options.append((count * (own[i] - longest), "hi"))
            if not options:
                break
            _, side = min(options)
            if side == "lo":
                lo -= 1
                own_sum += own[order[lo]]
            else:
                hi += 1
                longest = own[order[hi]]
                own_sum += longest
            count += 1

        chosen = set(order[lo : hi + 1])
        self._entries.extendleft(reversed([e for i, e in enumerate(window) if i not in chosen]))
        return [window[i] for i in sorted(chosen)]
