"""Frozen-bottom feature caching for top-k training of decoder reward models on a CPU.

When only the top k blocks train, the bottom blocks compute the same hidden states every epoch: run them once per
sequence and train the top blocks on the cached states. The prompt shared by a pair's chosen and rejected sequences
(their longest common token prefix) runs once, and both replies reuse its key/value cache. Both tricks are exact: the
served checkpoint recomputes everything and reads the same numbers (tested).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from app.batching import padded
from app.ml.collate import last_real_index
from app.ml.recipe import Encoded

_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


def can_split(backbone: nn.Module) -> bool:
    """Llama-style decoders (Llama, Qwen, Mistral, SmolLM...): the blocks loop honours `config.num_hidden_layers`."""
    return all(hasattr(backbone, part) for part in _PARTS) and isinstance(backbone.layers, nn.ModuleList)


def _shell(backbone: nn.Module, num_layers: int) -> nn.Module:
    config = copy.deepcopy(backbone.config)
    config.num_hidden_layers = num_layers
    with torch.device("meta"):
        shell = type(backbone)(config)
    return shell


@dataclass
class DecoderSplit:
    """`bottom`: embeddings + the first L-k blocks, no final norm. `top`: the last k blocks + final norm, fed with
    `inputs_embeds`. Both share the backbone's own modules, so training `top` trains the backbone."""

    bottom: nn.Module
    top: nn.Module

    @classmethod
    def of(cls, backbone: nn.Module, k: int) -> DecoderSplit:
        if not can_split(backbone):
            raise ValueError(f"{type(backbone).__name__} cannot be split for feature caching")
        layers = backbone.layers
        cut = len(layers) - k
        bottom, top = _shell(backbone, cut), _shell(backbone, k)
        for shell, blocks, norm in ((bottom, layers[:cut], nn.Identity()), (top, layers[cut:], backbone.norm)):
            shell.embed_tokens = backbone.embed_tokens
            shell.rotary_emb = backbone.rotary_emb
            shell.layers = nn.ModuleList(blocks)
            shell.norm = norm
        return cls(bottom=bottom, top=top)


@dataclass(frozen=True, slots=True)
class PairFeatures:
    """Hidden states entering the top blocks: a shared prefix and each side's suffix ([tokens, hidden])."""

    prefix: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor

    @property
    def length(self) -> int:
        return self.prefix.shape[0] + max(self.chosen.shape[0], self.rejected.shape[0])

    def sides(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.prefix, self.chosen]), torch.cat([self.prefix, self.rejected])


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Longest common prefix, leaving at least one token of each side to its suffix."""
    limit = min(len(a), len(b)) - 1
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


@torch.inference_mode()
def pair_features(bottom: nn.Module, chosen: Encoded, rejected: Encoded) -> PairFeatures:
    c, r = chosen.input_ids, rejected.input_ids
    p = shared_prefix(c, r)
    hidden = bottom.config.hidden_size
    if p == 0:
        prefix = torch.zeros(0, hidden)
        cache = None
    else:
        out = bottom(input_ids=torch.tensor([c[:p]]), use_cache=True)
        prefix = out.last_hidden_state[0]
        cache = out.past_key_values
        cache.batch_repeat_interleave(2)
    suffixes = [c[p:], r[p:]]
    width = max(len(s) for s in suffixes)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, p + width, dtype=torch.long)
    mask[:, :p] = 1
    for row, s in enumerate(suffixes):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, p : p + len(s)] = 1
    positions = (p + torch.arange(width)).expand(2, width)
    kwargs = {"cache": cache} if cache is not None else {}
    out = bottom(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **kwargs)
    states = out.last_hidden_state
    return PairFeatures(prefix, states[0, : len(suffixes[0])].clone(), states[1, : len(suffixes[1])].clone())


def top_rewards(top: nn.Module, head: nn.Linear, sequences: Sequence[torch.Tensor], multiple: int) -> torch.Tensor:
    """Rewards of cached sequences through the trainable top blocks, right-padded exactly as serving pads."""
    width = padded(max(s.shape[0] for s in sequences), multiple)
    embeds = torch.zeros(len(sequences), width, sequences[0].shape[1])
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, s in enumerate(sequences):
        embeds[row, : s.shape[0]] = s
        mask[row, : s.shape[0]] = 1
    positions = torch.arange(width).expand(len(sequences), width)
    hidden = top(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    last = hidden[torch.arange(len(sequences)), last_real_index(mask)]
    return head(last)[:, 0]
