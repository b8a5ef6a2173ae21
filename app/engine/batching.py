"""The batching policy: which queued items go into the next forward pass. Pure Python, no torch, no asyncio.

Cost model. Items that share a prompt (same `prefix_key`) can run it once: a batch runs one prefix pass (a row per
shared prompt, padded to the longest) and one suffix pass (a row per item: what follows its prompt, or the whole item
when it shares nothing), so it costs `prompts x longest prompt + items x longest suffix` padded tokens. Without shared
prompts this is the plain `items x longest item`.

Choice. Queued items are read through a bounded look-ahead window. Items sharing a prompt form units of similar
suffix lengths (a GRPO group whose replies differ widely in length becomes a few units, not one padded block); other
items are units of one. The unit holding the oldest item always goes next (nothing starves), joined by units of the
same kind (sharing a prompt or not: measured, mixing them is slower than either) and similar suffix length, one
neighbour at a time, while the batch stays under the token budget and the item cap and wastes little padding.
Items whose request was abandoned are dropped here, before they are computed.

Batch invariance (`batch_invariant`, the default where the model supports it): the model then packs a batch's items
with no padding (`model.packed`), so a batch costs its items' own tokens: lengths need not match and kinds may mix,
and units simply go oldest first while they fit. Every prompt is laid out once at the row's front, even one no other
queued item shares (the same path for every item, so whether a prompt was shared cannot move a reward).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Generic, Protocol, TypeVar

from app.model.shapes import padded


class Schedulable(Protocol):
    @property
    def length(self) -> int: ...

    @property
    def prefix(self) -> int:
        """Leading tokens that items with the same `prefix_key` have in common."""
        ...

    @property
    def prefix_key(self) -> Hashable | None: ...

    @property
    def abandoned(self) -> bool: ...


T = TypeVar("T", bound=Schedulable)

# Rows per linear call, batch-invariant. CPU: measured (docs/benchmarks.md): 512 keeps big batches as fast as the stock
# kernels (128 lost a third on grpo); a lone item pays for a whole block. Accelerators: larger, not measured.
AUTO_BLOCK_ROWS = {"cpu": 512, "cuda": 1024}


class Capabilities(Protocol):
    """What a loaded model can do, measured once (`RewardModel` has these)."""

    @property
    def max_length(self) -> int: ...

    @property
    def can_share_prefixes(self) -> bool: ...

    @property
    def can_be_invariant(self) -> bool: ...

    @property
    def device_type(self) -> str: ...


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch_tokens: int
    max_batch_size: int
    pad_to_multiple_of: int = 1
    min_padding_efficiency: float = 0.0  # own padded tokens / batch cost, for every batch formed
    lookahead: int = 256
    share_prefixes: bool = True
    batch_invariant: bool = True
    block_rows: int = 0  # 0: chosen for the model's device by `for_model`

    @property
    def invariant_rows(self) -> int | None:
        """The rows per linear call the model runs with (None: stock kernels, rewards move with the batch)."""
        return self.block_rows if self.batch_invariant else None

    @property
    def layout(self) -> tuple[int, bool, int | None]:
        """`RewardModel.plan`'s arguments after the items: how a batch this policy formed is laid out and run."""
        return self.pad_to_multiple_of, self.share_prefixes, self.invariant_rows

    def for_model(self, model: Capabilities) -> BatchPolicy:
        """This policy for a loaded model, checked once: prompts are shared, and items computed batch-invariantly,
        only where the settings ask and the model computes the same rewards that way (the cost model must match what
        runs), and one full-length item fits."""
        longest = padded(model.max_length, self.pad_to_multiple_of)
        if longest > self.max_batch_tokens:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) is smaller than one full-length item ({model.max_length} "
                f"tokens padded to {longest}); raise it or lower max_length"
            )
        share = self.share_prefixes and model.can_share_prefixes
        invariant = self.batch_invariant and model.can_be_invariant
        rows = self.block_rows or AUTO_BLOCK_ROWS.get(model.device_type, AUTO_BLOCK_ROWS["cuda"])
        return replace(self, share_prefixes=share, batch_invariant=invariant, block_rows=rows)


@dataclass(slots=True)
class _Unit:
    members: list[int]  # window indices
    prefix: int  # padded prefix length; 0: the members run whole
    suffixes: list[int]  # padded suffix length per member

    @property
    def widest(self) -> int:
        return max(self.suffixes)


@dataclass(slots=True)
class _Cost:
    """Running totals of a batch under construction."""

    items: int = 0
    prompts: int = 0
    longest_prefix: int = 0
    longest_suffix: int = 0
    own: int = 0  # what the batch's items would cost padded alone: the padding-efficiency numerator

    def plus(self, unit: _Unit) -> _Cost:
        shared = unit.prefix > 0
        return _Cost(
            items=self.items + len(unit.members),
            prompts=self.prompts + shared,
            longest_prefix=max(self.longest_prefix, unit.prefix),
            longest_suffix=max(self.longest_suffix, unit.widest),
            own=self.own + unit.prefix + sum(unit.suffixes),
        )

    def tokens(self, p: BatchPolicy) -> int:
        """Tokens the batch holds (what the budget bounds): packed, its own; padded, rows x widths."""
        if p.batch_invariant:
            return self.own
        return self.prompts * self.longest_prefix + self.items * self.longest_suffix

    def admitted(self, p: BatchPolicy) -> bool:
        tokens = self.tokens(p)
        return (
            self.items <= p.max_batch_size
            and tokens <= p.max_batch_tokens
            and self.own >= p.min_padding_efficiency * tokens
        )


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

    def prune(self) -> int:
        """Drop every abandoned entry now (not only when a batch reaches it); how many were dropped."""
        before = len(self._entries)
        self._entries = deque(e for e in self._entries if not e.abandoned)
        self.dropped += before - len(self._entries)
        return before - len(self._entries)

    def next_batch(self) -> list[T]:
        """The next batch to run (empty when nothing is queued), oldest first."""
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

        units = self._units(window)
        chosen = self._packed(units) if p.batch_invariant else self._padded(units)
        self._entries.extendleft(reversed([e for i, e in enumerate(window) if i not in chosen]))
        return [window[i] for i in sorted(chosen)]

    def _packed(self, units: list[_Unit]) -> set[int]:
        """Packed, there is no padding to save: units oldest first, each that still fits."""
        cost, chosen = _Cost(), set[int]()
        for unit in sorted(units, key=lambda u: min(u.members)):
            after = cost.plus(unit)
            if not chosen or after.admitted(self.policy):
                cost, chosen = after, chosen | set(unit.members)
        return chosen

    def _padded(self, units: list[_Unit]) -> set[int]:
        """Padded: the oldest entry's unit, joined by the neighbour (by width) that adds the least padding."""
        p = self.policy
        anchor = next(u for u in units if 0 in u.members)
        # a batch either shares prompts or runs whole items: a whole item riding in a shared batch would attend over
        # every prompt's padded cache and widen the suffix pass to its full length
        units = sorted((u for u in units if (u.prefix > 0) == (anchor.prefix > 0)), key=lambda u: u.widest)
        lo = hi = units.index(anchor)
        cost = _Cost().plus(units[lo])
        while True:
            options: list[tuple[int, int, _Cost]] = []  # (padding added, side, cost after)
            for side, i in ((-1, lo - 1), (1, hi + 1)):
                if 0 <= i < len(units):
                    after = cost.plus(units[i])
                    if after.admitted(p):
                        options.append(((after.tokens(p) - after.own) - (cost.tokens(p) - cost.own), side, after))
            if not options:
                break
            _, side, cost = min(options, key=lambda o: (o[0], -o[1]))  # ties: the longer side
            lo, hi = (lo - 1, hi) if side < 0 else (lo, hi + 1)
        return {i for unit in units[lo : hi + 1] for i in unit.members}

    def _units(self, window: Sequence[T]) -> list[_Unit]:
        """Window entries sharing a prompt, cut into runs of similar suffix length that each fit a batch alone;
        everything else one unit per entry."""
        p = self.policy
        m = 1 if p.batch_invariant else p.pad_to_multiple_of  # packed: no padding
        groups: dict[Hashable, list[int]] = {}
        units: list[_Unit] = []
        for i, entry in enumerate(window):
            key = entry.prefix_key if p.share_prefixes and entry.prefix > 0 else None
            if key is None:
                units.append(_Unit([i], 0, [padded(entry.length, m)]))
            else:
                groups.setdefault(key, []).append(i)
        for members in groups.values():
            if len(members) == 1 and not p.batch_invariant:
                units.append(_Unit(members, 0, [padded(window[members[0]].length, m)]))
                continue
            prefix = padded(window[members[0]].prefix, m)
            run = _Unit([], prefix, [])
            for i in sorted(members, key=lambda i: window[i].length):
                suffix = padded(window[i].length - window[i].prefix, m)
                grown = _Unit([*run.members, i], prefix, [*run.suffixes, suffix])
                if run.members and not _Cost().plus(grown).admitted(p):
                    units.append(run)
                    grown = _Unit([i], prefix, [suffix])
                run = grown
            units.append(run)
        for unit in units:  # a run of one shares nothing: run it whole (batch-invariant: every prompt runs apart)
            if unit.prefix and len(unit.members) == 1 and not p.batch_invariant:
                unit.prefix, unit.suffixes = 0, [padded(window[unit.members[0]].length, m)]
        return units
