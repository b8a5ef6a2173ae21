"""Padding a list of encodings into one batch (training, and models that cannot pack), and the index of the token the
value head reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from app.model.plan import Tokens
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

    def to(self, device: torch.device) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}  # not `asdict`: it deep-copies tensors
        return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def collate(items: Sequence[Tokens], pad_id: int, multiple: int = 1) -> Batch:
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


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position counting only real tokens so far: left or right padding reads as the item alone."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Last position with mask 1, for left or right padding alike (never a padding token, even when pad == eos)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(dim=1)
