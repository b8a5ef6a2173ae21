"""`reward-server train`'s settings: one object, every option with its default and why it exists (the CLI's flags
are generated from it)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["head", "top_k", "full", "lora"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    base_model: str = Field(description="registry key (e.g. smollm2-135m-instruct) or a local HF directory")
    train_file: Path
    dev_file: Path | None = None
    output: Path
    mode: Mode = "top_k"
    top_k: int = Field(4, ge=1, description="top_k mode: how many top transformer blocks to train")
    layers: int | None = Field(
        None,
        ge=1,
        description="keep only the base's first N blocks (top_k trains the last k of them): a shallower model, "
        "cheaper to train and to serve (None: all)",
    )
    lora_r: int = Field(16, ge=1)
    epochs: int = Field(2, ge=1)
    batch_pairs: int = Field(8, ge=1, description="pairs per optimizer micro-step")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)
    head_lr: float = Field(1e-3, gt=0)
    weight_decay: float = 0.0
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    center_coef: float = Field(0.0, ge=0, description="adds coef * mean((r_c + r_r)^2): keeps rewards centred at 0")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="target P(chosen) = 1 - this: margins past log((1-e)/e) earn nothing"
    )
    lr_schedule: Literal["linear", "constant"] = Field(
        "linear", description="after warm-up: decay linearly to 0, or hold (what weight averaging wants)"
    )
    average_from: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="average the weights of every step past this fraction of training (SWA); dev and the checkpoint"
        " use the mean",
    )
    length_term: float = Field(
        0.0,
        ge=0,
        description="add this x w x log(len chosen / len rejected) to the training logit only, w fitted per dataset "
        "on the train pairs beforehand: what length alone predicts is explained, so the served reward learns the rest "
        "(0: off, 1: all of it)",
    )
    max_length: int = Field(512, ge=8)
    system_prompt: str | None = None
    pad_to_multiple_of: int = Field(32, ge=1)
    bf16: bool = Field(
        False, description="bf16 autocast, caching included (fast on CPUs with AVX-512 BF16 or AMX and on GPUs)"
    )
    delta_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="the trained blocks' dtype in the checkpoint: bfloat16 halves it; dev is measured on the rounded "
        "weights, so the reported metrics are the shipped model's",
    )
    seed: int = 0
    max_train_pairs: int | None = Field(None, ge=1, description="train on a seeded random subset of this many pairs")
    max_dev_pairs: int | None = None
    calibrate: bool = Field(True, description="fit a temperature on dev and fold it into the head")
    cache_features: bool = Field(
        True, description="top_k on Llama-style decoders: run the frozen blocks once, not every epoch"
    )
    feature_cache: Path | None = Field(
        None, description="directory keeping cached features across runs (sweeps pay the frozen blocks once)"
    )
    threads: int | None = None
