"""Checkpoint formats on disk: the manifest we write, how a directory says which format it is, writing a
value-head checkpoint (what `reward-server train` saves and the `value_head` loader reads), and the recipe a
checkpoint without a manifest implies (a hub RM, an OpenRLHF checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from app.model import backbones
from app.model.recipe import ScoringRecipe
from app.model.steps import StepRule

MANIFEST = "reward_manifest.json"
HEAD_FILE = "value_head.safetensors"
Format = Literal["value_head", "peft", "openrlhf", "seq_cls", "process_reward", "causal_lm"]


class CheckpointError(RuntimeError):
    """The checkpoint cannot be served; the message names the file and the problem."""


class Normalization(BaseModel):
    """Static reward normalization, (r - mean) / std, as OpenRLHF stores it with a checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    mean: float = Field(0.0, ge=-1e6, le=1e6)
    std: float = Field(1.0, ge=1e-6, le=1e6)  # finite, and not so small that rounding noise becomes reward

    def apply(self, reward: float) -> float:
        return (reward - self.mean) / self.std


class Manifest(BaseModel):
    """`reward_manifest.json`: how to rebuild the model and how it reads a sequence."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = 1
    format: Format = "value_head"
    base_model: str | None = Field(None, description="registry key, or a path relative to the checkpoint; None: here")
    num_layers: int | None = Field(
        None, ge=1, description="the base's first N transformer blocks only (a shallower model); None: all of them"
    )
    backbone_delta: str | None = Field(None, description="safetensors of trained backbone parameters")
    adapter: str | None = Field(None, description="PEFT adapter directory, merged at load")
    head_file: str = HEAD_FILE
    recipe: ScoringRecipe | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="what the weights were trained in: REWARD_DTYPE=auto serves this"
    )
    normalization: Normalization | None = None
    attributes: list[str] | None = Field(None, description="a multi-output head's outputs, by name")
    attribute_weights: dict[str, float] | None = Field(
        None, description="the reward as a weighted sum of attributes, as the model's card recommends"
    )
    steps: StepRule | None = Field(None, description="a process reward model's step rule (`app.model.steps`)")
    extra: dict[str, Any] = Field(default_factory=dict, description="training metadata; not read when serving")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_manifest(path: Path) -> Manifest | None:
    file = path / MANIFEST
    if not file.exists():
        return None
    try:
        return Manifest.model_validate(read_json(file))
    except ValidationError as exc:
        raise CheckpointError(f"{file}: {exc}") from exc


def detect_format(path: Path, manifest: Manifest | None) -> Format:
    if manifest is not None:
        return manifest.format
    if (path / "adapter_config.json").exists():
        return "peft"
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json, {MANIFEST} or adapter_config.json: not a checkpoint directory")
    config = read_json(config_file)
    if "value_head_prefix" in config or "normalize_reward" in config:
        return "openrlhf"
    architectures = config.get("architectures") or []
    if any(str(a).endswith("ForSequenceClassification") for a in architectures):
        return "seq_cls"
    if any(str(a).endswith("ForProcessRewardModel") for a in architectures):
        return "process_reward"  # Qwen2.5-Math-PRM's (`app.model.steps`)
    if any(str(a).endswith("ForCausalLM") for a in architectures):
        return "causal_lm"  # a process reward model read from two tokens' logits, given its step rule
    raise CheckpointError(
        f"{config_file}: architectures {architectures} is not a sequence-classification model, and the directory has "
        f"no {MANIFEST} or value_head_prefix saying where its reward head is"
    )


def save_value_head_checkpoint(
    path: Path,
    *,
    backbone: nn.Module,
    head: nn.Linear,
    tokenizer: PreTrainedTokenizerBase,
    recipe: ScoringRecipe,
    base_model: str | None = None,
    trained_prefixes: list[str] | None = None,
    delta_dtype: torch.dtype = torch.float32,
    normalization: Normalization | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    num_layers: int | None = None,
    extra: dict[str, Any] | None = None,
    steps: StepRule | None = None,
) -> Manifest:
    """The inverse of the `value_head` loader. With `base_model`, only parameters under `trained_prefixes` are
    written (a small delta over a base the loader rebuilds); without it, the whole backbone is saved here. Only what
    training changed is written: a registered base's tokenizer is rebuilt from its package."""
    path.mkdir(parents=True, exist_ok=True)
    delta_name: str | None = None
    adapter: str | None = None
    if hasattr(backbone, "peft_config"):  # a PEFT model: only the adapter is new
        adapter = "adapter"
        backbone.save_pretrained(path / adapter)
    elif base_model is None:
        backbone.save_pretrained(path)
    elif trained_prefixes:
        delta = {
            k: v.detach().to("cpu", delta_dtype).contiguous()
            for k, v in backbone.state_dict().items()
            if any(k.startswith(prefix) for prefix in trained_prefixes)
        }
        if not delta:
            raise ValueError(f"no backbone parameter starts with {trained_prefixes}")
        delta_name = "backbone_delta.safetensors"
        save_file(delta, str(path / delta_name))
    save_file({k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}, str(path / HEAD_FILE))
    if base_model not in backbones.REGISTRY:  # a packaged base brings its tokenizer (and its fingerprint identity)
        tokenizer.save_pretrained(path)
    manifest = Manifest(
        base_model=base_model,
        num_layers=num_layers,
        backbone_delta=delta_name,
        adapter=adapter,
        recipe=recipe,
        normalization=normalization,
        dtype=dtype,
        extra=extra or {},
        steps=steps,
    )
    (path / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def depth(base_dir: Path, num_layers: int | None, where: Path) -> dict[str, int]:
    """`from_pretrained` keywords that keep the base's first `num_layers` blocks. More blocks than the base has is an
    error: transformers would add randomly initialised ones."""
    if num_layers is None:
        return {}
    have = read_json(base_dir / "config.json").get("num_hidden_layers")
    if not isinstance(have, int) or num_layers > have:
        raise CheckpointError(f"{where}: num_layers {num_layers}, but the base {base_dir} has {have} blocks")
    return {"num_hidden_layers": num_layers}


def fold_temperature(checkpoint: Path, temperature: float) -> None:
    """Divide the head by T so that sigmoid(r_a - r_b) is calibrated, and record T in the manifest."""
    head = load_file(str(checkpoint / HEAD_FILE))
    save_file({k: (v / temperature).contiguous() for k, v in head.items()}, str(checkpoint / HEAD_FILE))
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["extra"]["temperature"] = temperature
    (checkpoint / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


DEFAULT_MAX_LENGTH = 2048


def inferred_recipe(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, pooling: str) -> ScoringRecipe:
    """A checkpoint without a manifest: encoders read a text pair, chat models their template, others plain text."""
    limits = [DEFAULT_MAX_LENGTH]
    for value in (getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)):
        if isinstance(value, int) and 0 < value < 1_000_000:
            limits.append(value)
    max_length = min(limits)
    if pooling == "classifier":
        return ScoringRecipe(template="text_pair", max_length=max_length)
    if getattr(tokenizer, "chat_template", None):
        return ScoringRecipe(template="chat", max_length=max_length)
    return ScoringRecipe(template="concat", max_length=max_length)


def openrlhf_recipe(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> ScoringRecipe:
    """A sequence as OpenRLHF's RewardDataset (0.11) builds it in training: the chat template (or prompt + reply),
    trailing newlines stripped, " " + EOS unless it already ends with EOS, no tokenizer special tokens, truncated on
    the right with EOS last; the head reads that last token."""
    inferred = inferred_recipe(tokenizer, config, "last_token")
    changes = {"add_special_tokens": False, "append_eos": True, "eos_separator": " ", "truncation": "right"}
    return inferred.model_copy(update=changes)
