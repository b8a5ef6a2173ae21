"""Padding a list of encodings into one batch, and the index of the token the value head reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from app.model.recipe import Encoded
from app.model.shapes import padded


@dataclass(frozen=True, slots=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    token_type_ids: torch.Tensor | None
    last_index: torch.Tensor  # [B], the last position whose attention mask is 1

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in astuple_shallow(self)))


def collate(items: Sequence[Encoded], pad_id: int, multiple: int = 1) -> Batch:
    """Right padding, lengths rounded up to `multiple` (few distinct shapes: each new one costs time and memory).

    Every real token keeps the position it has alone, so causal models see exactly the same
    context whatever the batch; position ids are explicit so no model infers them from padding."""
    lengths = [len(item) for item in items]
    width = padded(max(lengths), multiple)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    with_types = items[0].token_type_ids is not None
    token_type_ids = torch.zeros((len(items), width), dtype=torch.long) if with_types else None
    for row, item in enumerate(items):
        n = len(item)
        input_ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        if token_type_ids is not None and item.token_type_ids is not None:
            token_type_ids[row, :n] = torch.tensor(item.token_type_ids, dtype=torch.long)
    position_ids = torch.arange(width, dtype=torch.long).expand(len(items), width)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        token_type_ids=token_type_ids,
        last_index=last_real_index(attention_mask),
    )


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Last position with mask 1, for left or right padding alike (never a padding token, even when pad == eos)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(dim=1)


@dataclass(frozen=True, slots=True)
class SharedBatch:
    """A batch whose items begin with shared prompts (a GRPO group, the two sides of a pair).

    Each distinct prefix runs once (`prefixes`, one row each); every item's remaining tokens (`suffix_ids`) then attend
    to the keys/values of its prefix's row (`group`) and continue its positions. Items with nothing to share join
    with an empty prefix (their prefix part of `attention_mask` is all 0). Exact for causal models: a token's state
    depends only on the tokens before it."""

    prefixes: Batch
    group: torch.Tensor  # [B] row of `prefixes` each item continues
    suffix_ids: torch.Tensor  # [B, Ls]
    attention_mask: torch.Tensor  # [B, Lp + Ls]
    position_ids: torch.Tensor  # [B, Ls]
    last_index: torch.Tensor  # [B] into the suffix
    real_tokens: int
    padded_tokens: int

    def __len__(self) -> int:
        return self.suffix_ids.shape[0]

    def to(self, device: torch.device) -> SharedBatch:
        return SharedBatch(*(t.to(device) if isinstance(t, torch.Tensor | Batch) else t for t in astuple_shallow(self)))


def astuple_shallow(obj: object) -> tuple[object, ...]:
    """A dataclass's field values, not recursed into (`dataclasses.astuple` deep-copies tensors)."""
    return tuple(getattr(obj, f.name) for f in fields(obj))  # type: ignore[arg-type]


def prefix_groups(items: Sequence[Encoded]) -> list[list[int]]:
    """Indices of items whose first `prefix` tokens are identical, for every prefix at least two items share."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(items):
        if item.prefix:
            groups.setdefault(tuple(item.input_ids[: item.prefix]), []).append(i)
    return [members for members in groups.values() if len(members) > 1]


def collate_shared(items: Sequence[Encoded], pad_id: int, multiple: int = 1) -> SharedBatch | None:
    """The shared-prefix layout of `items`, or None when no two items share a prefix."""
    groups = prefix_groups(items)
    if not groups:
        return None
    prefix_len = [0] * len(items)
    group = [0] * len(items)
    heads: list[Encoded] = []
    for row, members in enumerate(groups):
        first = items[members[0]]
        heads.append(Encoded(first.input_ids[: first.prefix], None, False))
        for i in members:
            prefix_len[i], group[i] = first.prefix, row
    prefixes = collate(heads, pad_id, multiple)
    width_p = prefixes.input_ids.shape[1]
    suffixes = [item.input_ids[p:] for item, p in zip(items, prefix_len, strict=True)]
    width_s = padded(max(len(s) for s in suffixes), multiple)
    suffix_ids = torch.full((len(items), width_s), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width_p + width_s), dtype=torch.long)
    for row, (s, p) in enumerate(zip(suffixes, prefix_len, strict=True)):
        suffix_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[row, :p] = 1
        attention_mask[row, width_p : width_p + len(s)] = 1
    position_ids = torch.tensor(prefix_len, dtype=torch.long)[:, None] + torch.arange(width_s, dtype=torch.long)
    return SharedBatch(
        prefixes=prefixes,
        group=torch.tensor(group, dtype=torch.long),
        suffix_ids=suffix_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        last_index=torch.tensor([len(s) - 1 for s in suffixes], dtype=torch.long),
        real_tokens=prefixes.real_tokens + sum(len(s) for s in suffixes),
        padded_tokens=prefixes.padded_tokens + suffix_ids.numel(),
    )
