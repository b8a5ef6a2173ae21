"""Reward heads read out of checkpoint files: a value head (`Linear(hidden, n)`), Qwen2.5-Math-PRM's two-layer `score`
head, and a causal LM's logits of two tokens (math-shepherd's `+`/`-`) as a `Linear(hidden, 2)`: the rows of its
`lm_head` for those tokens, so the model's own final norm and logits are read, with no vocabulary-wide matmul."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from app.model.checkpoint import CheckpointError


def tensors_of(files: list[Path], prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor under `prefix` in `files` (the prefix dropped), or a CheckpointError naming an unreadable file."""
    found: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                keys = [k for k in fh.keys() if k.startswith(prefix)]  # noqa: SIM118
                found.update({k[len(prefix) :]: fh.get_tensor(k) for k in keys})
        except Exception as exc:  # safetensors raises several types for a corrupt file
            raise CheckpointError(f"{file}: unreadable safetensors ({exc})") from exc
    return found


def load_head(file: Path, hidden_size: int, prefix: str = "") -> nn.Linear:
    if not file.exists():
        raise CheckpointError(f"{file}: value head weights missing")
    tensors = tensors_of([file], prefix)
    weight = tensors.get("weight")
    if weight is None or weight.ndim != 2 or weight.shape[1] != hidden_size:
        shape = None if weight is None else tuple(weight.shape)
        raise CheckpointError(f"{file}: expected '{prefix}weight' of shape [n, {hidden_size}], found {shape}")
    head = nn.Linear(hidden_size, weight.shape[0], bias="bias" in tensors)
    head.load_state_dict(tensors, strict=True)
    return head.float()


def safetensors_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def hidden_size(config: PretrainedConfig) -> int:
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    text = getattr(config, "text_config", None)
    if text is not None:
        return hidden_size(text)
    raise CheckpointError(f"cannot find the hidden size in config of type {config.model_type}")


def process_reward_head(path: Path, hidden: int) -> nn.Sequential:
    """Qwen2ForProcessRewardModel's `score`: Linear(h, h), ReLU, Linear(h, 2) (`score.0.*`, `score.2.*`)."""
    tensors = tensors_of(safetensors_files(path), "score.")
    head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: not a Qwen2ForProcessRewardModel score head ({exc})") from exc
    return head.float()


def logit_head(path: Path, config: PretrainedConfig, ids: tuple[int, int]) -> nn.Linear:
    """The LM head's rows for token `ids` (tied to the input embeddings where the config says so)."""
    files = safetensors_files(path)
    tied = getattr(config, "tie_word_embeddings", False)
    names = ("lm_head.weight",) if not tied else ("model.embed_tokens.weight", "embed_tokens.weight")
    for name in names:
        found = tensors_of(files, name)
        if "" in found:
            weight = found[""]
            break
    else:
        raise CheckpointError(f"{path}: no {' or '.join(names)} in any *.safetensors: not a causal LM's weights")
    head = nn.Linear(weight.shape[1], 2, bias=False)
    head.weight.data = weight[list(ids)].float().clone()
    return head


def token_pair(tokenizer: PreTrainedTokenizerBase, tokens: tuple[str, str]) -> tuple[int, int]:
    """The ids of the good and bad tokens as math-shepherd's card finds them: `encode(f"{good} {bad}")`, its own
    special tokens left out."""
    ids = tokenizer(f"{tokens[0]} {tokens[1]}", add_special_tokens=False).input_ids
    if len(ids) != 2:
        raise CheckpointError(f"the step rule's tokens {list(tokens)} are {len(ids)} tokens here, not one each")
    return ids[0], ids[1]


def outputs_of(head: nn.Module) -> int:
    """How many outputs a head has: its last linear's."""
    return [m for m in head.modules() if isinstance(m, nn.Linear)][-1].out_features
