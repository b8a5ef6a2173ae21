"""Batch-invariant kernels: each item's numbers a function of the item alone, whatever else shares its forward.

Two kernels moved a bf16 reward with its batch on CPU (docs/benchmarks.md): a matmul's result for one row depends on
how many rows the call has (oneDNN and MKL choose their blocking, and whether threads split the reduction, by shape;
measured: a [M, 576] x [576, 1536] bf16 product differs in the last bit for one row between M = 256 and M = 768),
and the attention kernel's depends on the padded length and on whether a padding mask is given at all. So, in the
invariant mode:
- every linear of the model (`nn.Linear`, GPT-2's `Conv1D`) runs in calls of exactly `rows` rows (the last call
  padded with zeros): a fixed shape gives every row the same arithmetic, whatever the other rows hold and wherever
  the row sits (measured);
- attention runs per item over that item's own tokens only (its shared prompt's keys, at the front of the packed
  row, and its own): the same call whether the item is alone or in any batch. Items are then packed with no padding
  at all (`packed`).
Elementwise ops and the per-row norms are row-local already. Outside `running` both kernels are the stock ones.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

ATTENTION = "reward_rowwise"
Span = tuple[int, int, int, int]  # (its prompt's offset in the row, that length, own offset, own length): `packed`

_rows: ContextVar[int | None] = ContextVar("reward_block_rows", default=None)
_per_item_calls = [0]  # attention calls that ran per item: the probe's proof that the spans reach attention


def _in_row_blocks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    """`x @ weight + bias` in calls of exactly [rows, in] x [in, out], written in place."""
    flat = x.reshape(-1, x.shape[-1])
    total = flat.shape[0]
    out = flat.new_empty(total, weight.shape[1])
    for start in range(0, total, rows):
        block = flat[start : start + rows]
        if block.shape[0] < rows:  # the tail: zero rows make up the block, computed by the same call
            tail = torch.cat((block, block.new_zeros(rows - block.shape[0], block.shape[1])))
            out[start:] = torch.mm(tail, weight, out=out.new_empty(rows, weight.shape[1]))[: block.shape[0]]
        else:
            torch.mm(block, weight, out=out[start : start + rows])
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[1])


class RowBlockLinear(nn.Linear):
    """`nn.Linear` whose rows run in fixed-size calls inside `running` (the class of an existing Linear is swapped,
    so its parameters, hooks and state-dict names stay as they are)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows.get()
        return super().forward(x) if rows is None else _in_row_blocks(x, self.weight.t(), self.bias, rows)


class RowBlockConv1D(Conv1D):
    """GPT-2's transposed linear (`x @ weight + bias` by `addmm` over every row at once), the same way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows.get()
        return super().forward(x) if rows is None else _in_row_blocks(x, self.weight, self.bias, rows)


def rowwise_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    reward_spans: Sequence[Span] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface, for a packed batch (`packed`): `reward_spans` (passed down through the
    backbone's forward) says where each item's own tokens and its shared prompt's are in the row. Without spans this
    is stock SDPA."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if reward_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("batch-invariant attention does not support logit soft-capping (nor does sdpa)")
    _per_item_calls[0] += 1
    index, starts, masks = _layout(tuple(reward_spans), kwargs.get("sliding_window"), query.dtype, key.device)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key.index_select(2, index), groups), repeat_kv(value.index_select(2, index), groups)
    out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
    for (_, cached, at, own), start, mask in zip(reward_spans, starts, masks, strict=True):
        q = query[:, :, at : at + own]
        k, v = key[:, :, start : start + cached + own], value[:, :, start : start + cached + own]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling)
        out[0, at : at + own] = o[0].transpose(0, 1)
    return out, None


@functools.lru_cache(maxsize=4)  # the batch in flight, asked again by every layer (per window, where layers differ)
def _layout(
    spans: tuple[Span, ...], window: int | None, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, list[int], list[torch.Tensor | None]]:
    """For one gather of the row's keys: each span's prompt tokens then its own (the index), where each span's start
    there, and each span's causal mask (None where SDPA's own causal flag says the same), additive in `dtype` as SDPA
    would turn a boolean one (so it is turned once per batch, not once per layer)."""
    parts, starts, masks, start = [], [], [], 0
    for cached_at, cached, at, own in spans:
        parts += [torch.arange(cached_at, cached_at + cached), torch.arange(at, at + own)]
        starts.append(start)
        start += cached + own
        mask = None
        if cached or (window and own > window):  # a causal band ending at each query's own position
            mask = torch.ones(own, cached + own, dtype=torch.bool).tril(cached)
            if window:
                mask &= ~torch.ones_like(mask).tril(cached - window)
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf")).to(device)
        masks.append(mask)
    return torch.cat(parts).to(device), starts, masks


BLOCKED: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: RowBlockLinear, Conv1D: RowBlockConv1D}


def install(backbone: nn.Module) -> bool:
    """Make `backbone` able to run invariantly (`running`; stock behaviour outside it): its linears become
    blocked (`RowBlockLinear`, `RowBlockConv1D`). Only for SDPA decoders: per-item attention replaces SDPA's causal
    attention."""
    from transformers import AttentionInterface

    config = getattr(backbone, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(ATTENTION, rowwise_attention)  # no mask function: transformers then builds none
    block_linears(backbone)
    return True


def block_linears(module: nn.Module) -> None:
    for sub in module.modules():
        if type(sub) in BLOCKED:
            sub.__class__ = BLOCKED[type(sub)]


@contextmanager
def running(backbone: nn.Module, rows: int) -> Iterator[None]:
    """Within: `backbone` (installed) and any blocked linear compute batch-invariantly."""
    config = backbone.config
    stock, config._attn_implementation = config._attn_implementation, ATTENTION
    token = _rows.set(rows)
    try:
        yield
    finally:
        _rows.reset(token)
        config._attn_implementation = stock


def per_item_calls() -> int:
    return _per_item_calls[0]
