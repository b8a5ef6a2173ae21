"""A Llama-style decoder cut in two at a block: the bottom's hidden states feed the top as `inputs_embeds`.

Training caches the bottom's states of frozen blocks (`app.training.features`); a shared-base model runs its members'
common bottom once and each member's own top (`app.model.family`). Both shells reuse the backbone's own modules."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


def can_split(backbone: nn.Module) -> bool:
    """Llama-style decoders (Llama, Qwen, Mistral, SmolLM...): the blocks loop honours `config.num_hidden_layers`."""
    return all(hasattr(backbone, part) for part in _PARTS) and isinstance(backbone.layers, nn.ModuleList)


@dataclass
class DecoderSplit:
    """`bottom`: embeddings + the blocks below the cut, no final norm. `top`: the blocks from the cut + final norm,
    fed with `inputs_embeds`. Both share the backbone's own modules, so training `top` trains the backbone."""

    bottom: nn.Module
    top: nn.Module

    @classmethod
    def of(cls, backbone: nn.Module, k: int) -> DecoderSplit:
        """The last `k` blocks on top."""
        return cls.at(backbone, len(backbone.layers) - k)

    @classmethod
    def at(cls, backbone: nn.Module, cut: int) -> DecoderSplit:
        """Blocks from `cut` on top."""
        if not can_split(backbone):
            raise ValueError(f"{type(backbone).__name__} cannot be split at a block")
        layers = backbone.layers
        bottom = shell(backbone, layers[:cut], nn.Identity())
        return cls(bottom=bottom, top=shell(backbone, layers[cut:], backbone.norm))


def shell(backbone: nn.Module, blocks: nn.ModuleList, norm: nn.Module) -> nn.Module:
    """A decoder of `backbone`'s class running `blocks` then `norm`, sharing its embeddings and rotary tables."""
    config = copy.deepcopy(backbone.config)
    config.num_hidden_layers = len(blocks)
    with torch.device("meta"):
        out = type(backbone)(config)
    out.embed_tokens = backbone.embed_tokens
    out.rotary_emb = backbone.rotary_emb
    out.layers = nn.ModuleList(blocks)
    out.norm = norm
    return out
