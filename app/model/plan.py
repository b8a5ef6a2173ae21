"""The plan of one forward pass: which items, in what order, laid out how, at what cost. Pure Python.

The batcher (`app.engine.batching`) grows a plan item by item, bounding its `cost`; the model (`RewardModel.run`)
executes exactly that plan. Two layouts, decided by the model once (`RewardModel.packs`):
- packed (every SDPA decoder read at its last token): one row, no padding. Each distinct prompt sits once at the
  row's front, even one no other item has, so an item runs the same way whatever shares its batch; then each item's
  own tokens, continuing its prompt's positions. Attention runs per span (`invariant.rowwise_attention`). Cost: the
  row's length.
- padded (encoders, other attention kernels): a row per item, right-padded to the longest. Cost: rows x longest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

Span = tuple[int, int, int, int]  # (its prompt's offset in the row, that length, own offset, own length)


class Tokens(Protocol):
    """An encoded item (`recipe.Encoded`): `prefix` leading ids are its prompt's own tokens."""

    @property
    def input_ids(self) -> list[int]: ...

    @property
    def token_type_ids(self) -> list[int] | None: ...

    @property
    def prefix(self) -> int: ...

    @property
    def reads(self) -> tuple[int, ...]: ...


@dataclass(slots=True)
class Plan:
    packed: bool
    items: list[Tokens] = field(default_factory=list)
    prompts: list[Span] = field(default_factory=list)  # packed: each distinct prompt, (0, 0, offset, length)
    heads: list[int] = field(default_factory=list)  # packed: per prompt, the item whose ids hold it
    spans: list[Span] = field(default_factory=list)  # packed: per item, (prompt offset, prompt length, offset, own)
    width: int = 0  # padded: the longest item
    _at: dict[tuple[int, ...], int] = field(default_factory=dict)  # prompt tokens -> index in `prompts`
    _own: int = 0  # packed: the items' own tokens

    def __len__(self) -> int:
        return len(self.items)

    @property
    def cost(self) -> int:
        """Rows the linears compute (what the token budget bounds)."""
        if self.packed:
            return sum(length for *_, length in self.prompts) + self._own
        return len(self.items) * self.width

    @property
    def real_tokens(self) -> int:
        """The tokens the plan's items hold, each shared prompt counted once."""
        return self.cost if self.packed else sum(len(item.input_ids) for item in self.items)

    def cost_with(self, item: Tokens, prompt: tuple[int, ...] | None = None) -> int:
        """`cost` once `item` is added; `prompt`: its prompt tokens, when the caller has them (`prompt_of`)."""
        if not self.packed:
            return (len(self.items) + 1) * max(self.width, len(item.input_ids))
        prompt = prompt_of(item) if prompt is None else prompt
        new_prompt = len(prompt) if prompt and prompt not in self._at else 0
        return self.cost + new_prompt + len(item.input_ids) - len(prompt)

    def add(self, item: Tokens, prompt: tuple[int, ...] | None = None) -> None:
        self.items.append(item)
        if not self.packed:
            self.width = max(self.width, len(item.input_ids))
            return
        prompt = prompt_of(item) if prompt is None else prompt
        if prompt and prompt not in self._at:
            self._at[prompt] = len(self.prompts)
            self.prompts.append((0, 0, -1, len(prompt)))  # offsets are settled by `layout`
            self.heads.append(len(self.items) - 1)
        own = len(item.input_ids) - len(prompt)
        self.spans.append((self._at[prompt] if prompt else -1, len(prompt), -1, own))
        self._own += own

    def layout(self) -> tuple[list[int], list[int], list[Span]]:
        """Packed: the row's token ids, their positions, and every attention span (the prompts', then the items',
        in order, with offsets into the row)."""
        ids: list[int] = []
        positions: list[int] = []
        spans: list[Span] = []
        for head, (*_, length) in zip(self.heads, self.prompts, strict=True):
            spans.append((0, 0, len(ids), length))
            ids += self.items[head].input_ids[:length]
            positions += range(length)
        for item, (prompt, cached, _, own) in zip(self.items, self.spans, strict=True):
            spans.append((spans[prompt][2] if cached else 0, cached, len(ids), own))
            ids += item.input_ids[cached:]
            positions += range(cached, cached + own)
        return ids, positions, spans


def prompt_of(item: Tokens) -> tuple[int, ...]:
    """The prompt tokens that `item` reads from the row's front (empty: it runs whole)."""
    return tuple(item.input_ids[: item.prefix])


def plan_of(items: Sequence[Tokens], packed: bool) -> Plan:
    """All of `items` in one plan, in order (no budget: offline calls and probes)."""
    plan = Plan(packed)
    for item in items:
        plan.add(item)
    return plan
