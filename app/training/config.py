"""`reward-server train`'s settings: one object, every option with its default and why a user would change it (the
CLI's flags, their types, ranges, choices and help are generated from it). The defaults are the recipe that trained
the shipped `models/default` wherever that recipe does not depend on the backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["head", "top_k", "full", "lora"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    base_model: str = Field(
        description="The backbone to start from: a registry key (e.g. smollm2-135m-instruct) or a local Hugging Face "
        "directory."
    )
    train_file: Path = Field(description="JSONL preference pairs to train on (prompt, chosen, rejected per line).")
    dev_file: Path | None = Field(
        None,
        description="JSONL pairs held out to pick the best epoch and fit the calibration temperature; without it the "
        "epoch with the lowest train loss is kept, uncalibrated.",
    )
    output: Path = Field(description="Directory the checkpoint, its manifest and its model card are written to.")
    mode: Mode = Field(
        "top_k",
        description="What trains: head (the value head only, cheapest), top_k (the last --top-k blocks, final norm "
        "and head: the recommended trade-off), full (every weight), lora (adapters on the attention projections).",
    )
    top_k: int = Field(
        3,
        ge=1,
        description="top_k mode: how many of the last blocks train; more fits closer but costs time and memory.",
    )
    layers: int | None = Field(
        None,
        ge=1,
        description="Keep only the base's first N blocks (top_k trains the last k of them): a shallower model, cheaper "
        "to train and to serve; the default model keeps 17 of SmolLM2-135M's 30 (none: every block).",
    )
    lora_r: int = Field(16, ge=1, description="lora mode: the adapters' rank; higher adds capacity and parameters.")
    epochs: int = Field(2, ge=1, description="Passes over the training pairs; the best epoch on dev is kept.")
    batch_pairs: int = Field(
        8, ge=1, description="Pairs per micro-step: lower it when memory runs out and raise --grad-accum to match."
    )
    grad_accum: int = Field(
        2,
        ge=1,
        description="Micro-steps per optimizer step: the effective batch is batch-pairs x this, without its memory.",
    )
    lr: float = Field(
        4e-4,
        gt=0,
        description="Learning rate of the trained backbone weights; the default suits top_k and lora on small models, "
        "full fine-tuning wants about 10x less.",
    )
    head_lr: float = Field(
        2e-3, gt=0, description="Learning rate of the value head, which starts at random and needs larger steps."
    )
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay (backbone and head): a regulariser worth trying on small datasets."
    )
    warmup_ratio: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Fraction of the steps over which the learning rates ramp up from 0, so a random head's first "
        "gradients do not shake the backbone.",
    )
    center_coef: float = Field(
        0.01,
        ge=0,
        description="Adds coef x mean((r_chosen + r_rejected)^2) to the loss: the loss sees only differences, so this "
        "keeps rewards centred at 0 (0: off).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Target P(chosen) = 1 - this: margins past log((1-e)/e) earn nothing; for noisy labels.",
    )
    lr_schedule: Literal["linear", "constant"] = Field(
        "constant",
        description="After warm-up: hold the rate (what weight averaging wants), or decay it linearly to 0 (for runs "
        "without --average-from).",
    )
    average_from: float | None = Field(
        0.25,
        ge=0,
        lt=1,
        description="Average the weights of every step past this fraction of training (SWA); dev and the checkpoint "
        "use the mean, which ranks as well and calibrates better than the last step (none: off).",
    )
    length_term: float = Field(
        0.0,
        ge=0,
        description="Add this x w x log(len chosen / len rejected) to the training logit only, w fitted per dataset "
        "on the train pairs beforehand: what length alone predicts is explained, so the served reward learns the rest "
        "(0: off, 1: all of it).",
    )
    max_length: int = Field(
        1024,
        ge=8,
        description="Tokens per prompt + reply, recorded in the scoring recipe; longer items lose the prompt's start "
        "(the reply's end is kept); longer costs time and memory.",
    )
    system_prompt: str | None = Field(
        None,
        description="chat templates: the system message given to conversations that have none, recorded in the "
        "recipe; unset: the template's own (SmolLM2's names itself), the default model used '' (empty).",
    )
    pad_to_multiple_of: int = Field(
        32, ge=1, description="Pad batches to a multiple of this many tokens: fewer distinct shapes for the kernels."
    )
    bf16: bool = Field(
        False, description="bf16 autocast, caching included: fast on CPUs with AVX-512 BF16 or AMX and on GPUs."
    )
    delta_dtype: Literal["float32", "bfloat16"] = Field(
        "bfloat16",
        description="The trained blocks' dtype in the checkpoint: bfloat16 halves it; dev is measured on the rounded "
        "weights, so the reported metrics are the shipped model's.",
    )
    seed: int = Field(0, description="Seeds the head, the shuffling and subsets: vary it to see run-to-run spread.")
    ensemble: int = Field(
        1,
        ge=1,
        description="Train this many members, each on its own seed (seed + k) and bootstrap resample of the pairs, "
        "into OUTPUT/member<k>, with OUTPUT/models.toml serving them as one ensemble (their shared base runs once).",
    )
    bootstrap: bool = Field(
        False,
        description="Train on a seeded resample of the pairs drawn with replacement (what --ensemble gives each "
        "member, so that they differ in data as well as in seed).",
    )
    max_train_pairs: int | None = Field(
        None, ge=1, description="Train on a seeded random subset of this many pairs: quick trials (none: all)."
    )
    max_dev_pairs: int | None = Field(
        None, ge=1, description="Evaluate on the first N dev pairs only: faster epochs, a noisier choice (none: all)."
    )
    calibrate: bool = Field(
        True, description="Fit a temperature on dev and fold it into the head, so sigmoid(margin) is a probability."
    )
    cache_features: bool = Field(
        True,
        description="top_k on Llama-style decoders: run the frozen blocks once, not every epoch (off: recompute them, "
        "holding no features in memory).",
    )
    feature_cache: Path | None = Field(
        None, description="Directory keeping cached features across runs, so sweeps pay the frozen blocks once."
    )
    prm: bool = Field(
        False,
        description="Train a process reward model: the files hold step-labelled solutions (README: Process reward "
        "models), binary cross-entropy of the value head's sigmoid at each step's tag.",
    )
    step_tag: str = Field("\n", min_length=1, description="--prm: the text that ends each step, read there.")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (unset: torch's choice, every core); set it on a shared machine."
    )
