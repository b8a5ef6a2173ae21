"""Fingerprints: equal fingerprints give equal rewards for equal inputs. Every scoring response carries one.

A model's fingerprint covers what it computes with: the checkpoint files loading reads (not optimizer states, trainer
state or `checkpoint-*/` snapshots), the base model by content, the recipe (max length included), the head index, the
dtype, the device type, the attention implementation, and torch and transformers major.minor. A scoring fingerprint
adds how the kernels run a plan and the normalization reported.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers

from app.model import backbones

# Written by training, read by no loader: they never change a reward.
_SKIPPED_DIRS = ("eval", "runs", "logs", "checkpoint-")
_SKIPPED_NAMES = {"trainer_state.json", "training_args.bin", "train_summary.json"}
_SKIPPED_SUFFIXES = {".md", ".png", ".jpg", ".svg", ".pt", ".pth", ".ckpt", ".log"}


def scoring_files(path: Path) -> Iterator[Path]:
    """The files under `path` that can affect a reward, in a stable order."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        parts = file.relative_to(path).parts
        if any(part.startswith((".", *_SKIPPED_DIRS)) for part in parts[:-1]) or parts[-1].startswith("."):
            continue
        if file.name in _SKIPPED_NAMES or file.suffix.lower() in _SKIPPED_SUFFIXES:
            continue
        if file.name.startswith(("optimizer", "scheduler", "rng_state")):
            continue
        yield file


def content_digest(path: Path) -> str:
    """sha256 over the names and contents of `scoring_files(path)`."""
    digest = hashlib.sha256()
    for file in scoring_files(path):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + backbones.sha256_file(file).encode() + b"\0")
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """The libraries whose major.minor a fingerprint covers (a kernel change there can move a reward)."""
    return {
        name: ".".join(module.__version__.split(".")[:2])
        for name, module in (("torch", torch), ("transformers", transformers))
    }


def fingerprint(**parts: Any) -> str:
    """16 hex digits of sha256 over `parts` (JSON, keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(
    path: Path,
    *,
    base: str | None,
    recipe: dict[str, Any],
    readout: dict[str, Any],
    dtype: torch.dtype,
    device: torch.device,
    attention: str | None,
) -> str:
    return fingerprint(
        files=content_digest(path),
        base=base,
        recipe=recipe,
        **readout,
        dtype=str(dtype),
        device=device.type,
        attention=attention,
        **versions(),
    )


def scoring_fingerprint(model: str, kernels: dict[str, Any], normalization: dict[str, float] | None) -> str:
    """What a server (or an offline scorer) reports: the model's fingerprint with how its kernels run a plan
    (`Kernels.fingerprint_part`: the layout, and for invariant kernels the linears' calls and the CPU threads, since a
    reduction's order follows its thread split) and the normalization."""
    return fingerprint(model=model, kernels=kernels, normalization=normalization)
