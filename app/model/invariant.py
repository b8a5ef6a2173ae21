"""Batch-invariant kernels: each item's numbers a function of the item alone, whatever else shares its forward.

Two kernels moved a bf16 reward with its batch on CPU (docs/benchmarks.md): a matmul's result for one row depends on
how many rows the call has (oneDNN and MKL choose their blocking, and whether threads split the reduction, by shape;
measured: a [M, 576] x [576, 1536] bf16 product differs in the last bit for one row between M = 256 and M = 768),
and the attention kernel's depends on the padded length and on whether a padding mask is given at all. So, in the
invariant mode:
- every `nn.Linear` of the model runs in calls of exactly `rows` rows (the last call padded with zeros): a fixed shape
  gives every row the same arithmetic, whatever the other rows hold and wherever the row sits (measured);
- attention runs per item over that item's own tokens only (its prompt's keys, when the prompt ran in a separate
  pass, and its own), never over padding: the same call whether the item is alone, padded or in any batch.
Elementwise ops and the per-row norms are row-local already. Outside the mode (`rows` unset) both kernels are the
stock ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = "reward_rowwise"
Spans = Sequence[tuple[int, int]]  # per row: (prompt tokens held in the cache, the row's own real tokens)

_rows: ContextVar[int | None] = ContextVar("reward_block_rows", default=None)
_per_item_calls = [0]  # attention calls that ran per item: the probe's proof that the spans reached every layer


@contextmanager
def block_rows(rows: int | None) -> Iterator[None]:
    """Within: linears run in calls of exactly `rows` rows (None: stock kernels)."""
    token = _rows.set(rows)
    try:
        yield
    finally:
        _rows.reset(token)


class RowBlockLinear(nn.Linear):
    """`nn.Linear` whose rows run in fixed-size calls inside `block_rows` (the class of an existing Linear is swapped,
    so its parameters, hooks and state-dict names stay as they are)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows.get()
        if rows is None:
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])
        total = flat.shape[0]
        pad = -total % rows
        if pad:
            flat = torch.cat((flat, flat.new_zeros(pad, flat.shape[1])))
        blocks = [F.linear(flat[i : i + rows], self.weight, self.bias) for i in range(0, total + pad, rows)]
        return torch.cat(blocks)[:total].reshape(*x.shape[:-1], -1)


def rowwise_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    reward_spans: Spans | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface. `reward_spans` (passed through the backbone's forward) turns the per-item
    kernel on; without it this is stock SDPA. Query rows: an item's own tokens, right-padded; key rows: its prompt's
    cached keys (right-padded to `Lk - Lq`), then its own tokens."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if reward_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("batch-invariant attention does not support logit soft-capping (nor does sdpa)")
    _per_item_calls[0] += 1
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    window = kwargs.get("sliding_window")
    prompt_width = key.shape[2] - query.shape[2]
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    causal = getattr(module, "is_causal", True)
    for row, (cached, own) in enumerate(reward_spans):
        q = query[row : row + 1, :, :own]
        k = key[row : row + 1, :, prompt_width : prompt_width + own]
        v = value[row : row + 1, :, prompt_width : prompt_width + own]
        if cached:
            k = torch.cat((key[row : row + 1, :, :cached], k), dim=2)
            v = torch.cat((value[row : row + 1, :, :cached], v), dim=2)
        mask = None
        if cached or (window and own > window):  # a causal band that ends at each query's own position
            mask = torch.ones(own, cached + own, dtype=torch.bool, device=q.device).tril(cached)
            if window:
                mask &= ~torch.ones_like(mask).tril(cached - window)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scaling)
        out[row, :own] = o[0].transpose(0, 1)
    return out, None


def install(backbone: nn.Module) -> bool:
    """Make `backbone` able to run invariantly (stock behaviour until asked): its linears become `RowBlockLinear`,
    its attention `rowwise_attention`. Only for SDPA models, whose masks and numbers the stock path keeps."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    config = getattr(backbone, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTENTION, rowwise_attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the stock path builds the masks SDPA would get
    block_linears(backbone)
    config._attn_implementation = ATTENTION
    return True


def block_linears(module: nn.Module) -> None:
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = RowBlockLinear


def per_item_calls() -> int:
    return _per_item_calls[0]


def spans(attention_mask: torch.Tensor, prompt_width: int = 0) -> list[tuple[int, int]]:
    """Per row: real tokens in the first `prompt_width` columns (a cached prompt) and in the rest (the row's own)."""
    own = attention_mask[:, prompt_width:].sum(dim=1).tolist()
    cached = attention_mask[:, :prompt_width].sum(dim=1).tolist() if prompt_width else [0] * len(own)
    return list(zip(cached, own, strict=True))
