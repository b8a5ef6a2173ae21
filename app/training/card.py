"""The model card (`README.md`) written beside every trained checkpoint: what it is, the exact command, what it
measured."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch

from app.model.recipe import ScoringRecipe

if TYPE_CHECKING:
    from app.training.config import TrainConfig


def model_card(
    cfg: TrainConfig, recipe: ScoringRecipe, summary: dict[str, object], n_train: int, n_dev: int, command: str
) -> str:
    """README.md of the checkpoint: what it is, how it was made (the exact command), what it measured."""
    history = summary["history"]
    assert isinstance(history, list)
    dev = "accuracy", "log_loss", "chosen_shorter_accuracy", "chosen_longer_accuracy", "reward_length_correlation"
    rows = "\n".join(
        f"| {h['epoch']} | {h['train_loss']:.4f} | "
        + " | ".join(f"{h.get(f'dev_{k}', float('nan')):.4f}" for k in dev)
        + f" | {h['elapsed_s'] / 60:.1f} |"
        for h in history
    )
    columns = ("epoch", "train loss", "dev accuracy (before calibration)", "dev log-loss", "chosen shorter: accuracy")
    columns += ("chosen longer: accuracy", "corr(reward, length)", "elapsed (min)")
    table = f"| {' | '.join(columns)} |\n|{'---:|' * len(columns)}\n{rows}"
    settings = "\n".join(f"| `{k}` | `{v}` |" for k, v in json.loads(cfg.model_dump_json()).items())
    minutes = float(summary["train_seconds"]) / 60  # type: ignore[arg-type]
    reused = float(summary["reused_feature_seconds"]) / 60  # type: ignore[arg-type]
    timing = f"{minutes:.1f} min (encoding and feature caching included)"
    if reused:
        timing += (
            f"; {reused:.1f} min of it is the feature caching of entries reused from `--feature-cache`, as measured"
            f" when they were computed (this run's wall time: {minutes - reused:.1f} min)"
        )
    trained = f"trained: top {cfg.top_k} blocks + final norm + head" if cfg.mode == "top_k" else f"trained: {cfg.mode}"
    if cfg.layers is not None:
        trained = f"the base's first {cfg.layers} blocks (the rest dropped); {trained}"
    if cfg.delta_dtype != "float32":
        trained += f", stored in {cfg.delta_dtype}"
    return f"""# Reward model: {cfg.base_model}, {cfg.mode}

A value-head reward model trained by `reward-server train` with the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected - margin) on human preference pairs. Serve it with
`reward-server serve --model <this directory>`.

- Base model: `{cfg.base_model}`; {trained}.
- Data: `{cfg.train_file}` ({n_train} pairs), selected on `{cfg.dev_file}` ({n_dev} pairs).
- Best epoch: {summary["best_epoch"]}; calibration temperature folded into the head: {summary["temperature"]}.
- Training time, measured: {timing}, {torch.get_num_threads()} threads on {summary.get("cpu", "an unrecorded CPU")}.
- Scoring recipe (`reward_manifest.json`): `{recipe.model_dump_json()}`

{table}

## Command

```bash
{command}
```

## Hyperparameters

| setting | value |
|---|---|
{settings}

Evaluation on the dev set, if run, is in `eval/` (`reward-server eval --model . --data <dev.jsonl> --out eval`).
"""
