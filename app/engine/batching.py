"""The batcher: which queued items go into the next forward pass, as a `Plan` the model runs as it is. Pure Python,
no torch, no asyncio; not thread-safe (the worker calls it from the event loop only).

Oldest first: the plan takes queued items in arrival order while the next one fits the item cap and the token
budget (a plan's `cost`: packed, its row's length, each shared prompt once; padded, rows x longest). Nothing
starves, and a packed plan has no padding to save by reordering. Items whose request was abandoned are dropped as
the plan reaches them, or all at once by `prune`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from app.model.plan import Plan, Tokens


class Schedulable(Protocol):
    @property
    def encoded(self) -> Tokens: ...

    @property
    def prompt(self) -> tuple[int, ...]:
        """The leading tokens it reads from the row's front (`plan.prompt_of`), computed once."""
        ...

    @property
    def abandoned(self) -> bool: ...


T = TypeVar("T", bound=Schedulable)


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch_tokens: int
    max_batch_size: int
    packed: bool = True

    def check(self, max_length: int) -> None:
        """One full-length item must fit a plan alone."""
        if max_length > self.max_batch_tokens:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) is smaller than one full-length item ({max_length} "
                "tokens); raise it or lower max_length"
            )


class TokenBudgetQueue(Generic[T]):
    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._entries: deque[T] = deque()
        self.dropped = 0  # abandoned entries skipped so far

    def __len__(self) -> int:
        return len(self._entries)

    def extend(self, entries: Iterable[T]) -> None:
        self._entries.extend(entries)

    def requeue(self, entries: list[T]) -> None:
        """Entries of a plan not run after all, back at the front in their order."""
        self._entries.extendleft(reversed(entries))

    def replan(self, entries: list[T]) -> Plan:
        """A plan of exactly `entries` (split-and-retry, or a plan some of whose requests left)."""
        plan = Plan(self.policy.packed)
        for entry in entries:
            plan.add(entry.encoded, entry.prompt)
        return plan

    def prune(self) -> int:
        """Drop every abandoned entry now (not only when a plan reaches it); how many were dropped."""
        before = len(self._entries)
        self._entries = deque(e for e in self._entries if not e.abandoned)
        self.dropped += before - len(self._entries)
        return before - len(self._entries)

    def next_plan(self) -> tuple[list[T], Plan] | None:
        """The next plan and its entries, in the plan's order (None when nothing live is queued)."""
        p, entries = self.policy, self._entries
        chosen: list[T] = []
        plan = Plan(p.packed)
        while entries:
            entry = entries[0]
            if entry.abandoned:
                entries.popleft()
                self.dropped += 1
                continue
            if chosen and (
                len(chosen) >= p.max_batch_size or plan.cost_with(entry.encoded, entry.prompt) > p.max_batch_tokens
            ):
                break
            plan.add(entries.popleft().encoded, entry.prompt)
            chosen.append(entry)
        return (chosen, plan) if chosen else None
