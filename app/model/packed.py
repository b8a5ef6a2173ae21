"""The batch-invariant layout: every item's tokens back to back in one row, no padding.

With attention computed per item over its own tokens (`invariant.rowwise_attention`) and every other op row-wise, an
item needs no padding to stay apart from its neighbours, so none is computed: the linears see exactly the batch's
tokens (in blocks of `block_rows`). Positions restart at 0 for each item, as if it were alone. With prompts shared,
each distinct prompt's tokens sit once at the front of the same row, and an item's own tokens attend to its prompt's
keys/values there and continue its positions: one pass, and an item's numbers are the same whatever its batch (a
linear's row is a function of that row alone at a fixed call shape; attention reads only the item's spans).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from app.model.invariant import Span
from app.model.recipe import Encoded


@dataclass(frozen=True, slots=True)
class PackedBatch:
    input_ids: torch.Tensor  # [1, T]: the distinct shared prompts, then each item's own tokens
    position_ids: torch.Tensor  # [1, T]
    spans: list[Span]  # every span attention computes: the prompts' first, then one per item, in order
    items: int  # the last `items` spans are the items'
    block_rows: int

    def __len__(self) -> int:
        return self.items

    @property
    def last_index(self) -> torch.Tensor:
        return torch.tensor([own + length - 1 for _, _, own, length in self.spans[-self.items :]], dtype=torch.long)

    @property
    def real_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def padded_tokens(self) -> int:
        """Rows the linears compute: the packed tokens rounded up to whole blocks."""
        return -(-self.input_ids.shape[1] // self.block_rows) * self.block_rows

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device), self.position_ids.to(device), self.spans, self.items, self.block_rows
        )


def pack(items: Sequence[Encoded], block_rows: int, share: bool) -> PackedBatch:
    """`items` packed; with `share`, every item that has a prompt (`Encoded.prefix`) reads it from the row's front,
    once per distinct prompt, even a prompt no other item has (so no item's path depends on its neighbours)."""
    ids: list[int] = []
    positions: list[int] = []
    spans: list[Span] = []
    heads: dict[tuple[int, ...], tuple[int, int]] = {}  # prompt -> (offset, length) in the row
    for item in items if share else ():
        head = tuple(item.input_ids[: item.prefix])
        if item.prefix and head not in heads:
            heads[head] = (len(ids), len(head))
            spans.append((0, 0, len(ids), len(head)))
            ids += head
            positions += range(len(head))
    for item in items:
        prefix = item.prefix if share else 0
        cached_at, cached = heads[tuple(item.input_ids[:prefix])] if prefix else (0, 0)
        own = item.input_ids[prefix:]
        spans.append((cached_at, cached, len(ids), len(own)))
        ids += own
        positions += range(prefix, prefix + len(own))
    as_row = lambda values: torch.tensor(values, dtype=torch.long)[None]  # noqa: E731
    return PackedBatch(as_row(ids), as_row(positions), spans, len(items), block_rows)
