"""Frozen-bottom feature caching for top-k training of decoder reward models on a CPU.

When only the top k blocks train, the bottom blocks compute the same hidden states every epoch: run them once per
sequence and train the top blocks on the cached states. The prompt shared by a pair's chosen and rejected sequences
(their longest common token prefix) runs once, and both replies reuse its key/value cache. Both tricks are exact: the
served checkpoint recomputes everything and reads the same numbers (tested).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from app.model.collate import collate_shared, last_real_index
from app.model.recipe import Encoded, common_prefix
from app.model.reward_model import shared_hidden
from app.model.shapes import padded

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
    return max(0, min(common_prefix(a, b), min(len(a), len(b)) - 1))


@torch.inference_mode()
def pair_features(bottom: nn.Module, chosen: Encoded, rejected: Encoded) -> PairFeatures:
    c, r = chosen.input_ids, rejected.input_ids
    p = shared_prefix(c, r)
    batch = collate_shared([Encoded(c, None, False, p), Encoded(r, None, False, p)], pad_id=0)
    if batch is None:  # nothing in common, not even a BOS
        c_states, r_states = (bottom(input_ids=torch.tensor([s]), use_cache=False).last_hidden_state[0] for s in (c, r))
        return PairFeatures(torch.zeros(0, bottom.config.hidden_size), c_states, r_states)
    prefix, suffix = shared_hidden(bottom, batch)
    return PairFeatures(prefix[0, :p].clone(), suffix[0, : len(c) - p].clone(), suffix[1, : len(r) - p].clone())


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


class FeatureStore:
    """Pair features on disk, so hyperparameter sweeps on a CPU pay for the frozen blocks once.

    An entry is keyed by the frozen blocks' weights and the pair's token ids (which already carry the recipe), so any
    run whose bottom computes the same numbers reuses it: another subset, seed, learning rate or epoch count. Each
    entry keeps the seconds it took to compute, so a run that reuses entries can still state its from-scratch time.
    """

    def __init__(self, root: Path, bottom: nn.Module) -> None:
        self.root, self.bottom = root, bottom  # the module the keys fingerprint is the one that computes misses
        digest = hashlib.sha256(f"{type(bottom).__name__}:{bottom.config.num_hidden_layers}".encode())
        for name, tensor in sorted(bottom.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
        self.fingerprint = digest.hexdigest()
        self.reused_seconds = 0.0  # compute time of the entries read back, as measured when they were written

    def _path(self, chosen: Encoded, rejected: Encoded) -> Path:
        ids = json.dumps([self.fingerprint, chosen.input_ids, rejected.input_ids])
        key = hashlib.sha256(ids.encode()).hexdigest()
        return self.root / key[:2] / f"{key}.safetensors"

    def features(self, chosen: Encoded, rejected: Encoded) -> PairFeatures:
        path = self._path(chosen, rejected)
        if path.exists():
            with safe_open(str(path), framework="pt") as f:
                self.reused_seconds += float(f.metadata()["seconds"])
                return PairFeatures(*(f.get_tensor(name) for name in ("prefix", "chosen", "rejected")))
        started = time.perf_counter()
        out = pair_features(self.bottom, chosen, rejected)
        seconds = time.perf_counter() - started
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")  # a run killed mid-write leaves no entry that looks complete
        tensors = {"prefix": out.prefix, "chosen": out.chosen, "rejected": out.rejected}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata={"seconds": repr(seconds)})
        partial.replace(path)
        return out
