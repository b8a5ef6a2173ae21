"""The batch-invariant layout: every item's tokens back to back in one row, no padding.

With attention computed per item over its own tokens (`invariant.rowwise_attention`) and every other op row-wise, an
item needs no padding to stay apart from its neighbours, so none is computed: the linears see exactly the batch's
tokens (in blocks of `block_rows`). Positions restart at 0 for each item, as if it were alone. With prompts shared,
a first pass runs each distinct prompt once (also packed), and every item's own tokens then attend to its prompt's
keys/values in that pass's cache and continue its positions: the same two passes for an item whatever its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from app.model.invariant import Span
from app.model.recipe import Encoded


@dataclass(frozen=True, slots=True)
class PackedBatch:
    input_ids: torch.Tensor  # [1, T] the items' own tokens (after their prompt when `prompts` is set)
    position_ids: torch.Tensor  # [1, T]
    spans: list[Span]  # per item
    block_rows: int
    prompts: PackedBatch | None = None  # the distinct prompts, run first; their cache serves `spans`' cached part

    def __len__(self) -> int:
        return len(self.spans)

    @property
    def last_index(self) -> torch.Tensor:
        return torch.tensor([own + length - 1 for _, _, own, length in self.spans], dtype=torch.long)

    @property
    def real_tokens(self) -> int:
        return self.input_ids.shape[1] + (self.prompts.real_tokens if self.prompts is not None else 0)

    @property
    def padded_tokens(self) -> int:
        """Rows the linears compute: the packed tokens of each pass rounded up to whole blocks."""
        blocked = -(-self.input_ids.shape[1] // self.block_rows) * self.block_rows
        return blocked + (self.prompts.padded_tokens if self.prompts is not None else 0)

    def to(self, device: torch.device) -> PackedBatch:
        prompts = self.prompts.to(device) if self.prompts is not None else None
        return PackedBatch(
            self.input_ids.to(device), self.position_ids.to(device), self.spans, self.block_rows, prompts
        )


def _pack(rows: Sequence[Sequence[int]], starts: Sequence[int], block_rows: int) -> PackedBatch:
    """`rows` back to back; row i's positions count on from `starts[i]`."""
    spans: list[Span] = []
    ids: list[int] = []
    positions: list[int] = []
    for row, start in zip(rows, starts, strict=True):
        spans.append((0, 0, len(ids), len(row)))
        ids += row
        positions += range(start, start + len(row))
    as_row = lambda values: torch.tensor(values, dtype=torch.long)[None]  # noqa: E731
    return PackedBatch(as_row(ids), as_row(positions), spans, block_rows)


def pack(items: Sequence[Encoded], block_rows: int, share: bool) -> PackedBatch:
    """`items` packed; with `share`, every item that has a prompt (`Encoded.prefix`) runs it in the prompt pass,
    once per distinct prompt, even a prompt no other item has (so no item's path depends on its neighbours)."""
    if not share or not any(item.prefix for item in items):
        return _pack([item.input_ids for item in items], [0] * len(items), block_rows)
    heads: dict[tuple[int, ...], int] = {}
    for item in items:
        if item.prefix:
            heads.setdefault(tuple(item.input_ids[: item.prefix]), len(heads))
    prompts = _pack(list(heads), [0] * len(heads), block_rows)
    own = _pack([item.input_ids[item.prefix :] for item in items], [item.prefix for item in items], block_rows)
    spans: list[Span] = []
    for item, (_, _, offset, length) in zip(items, own.spans, strict=True):
        if item.prefix:
            _, _, p_offset, p_length = prompts.spans[heads[tuple(item.input_ids[: item.prefix])]]
            spans.append((p_offset, p_length, offset, length))
        else:
            spans.append((0, 0, offset, length))
    return PackedBatch(own.input_ids, own.position_ids, spans, block_rows, prompts)
