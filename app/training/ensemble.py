"""Reward-model ensembles: `reward-server train --ensemble K` and what `reward-server eval` reports of one.

Members differ by seed and by a bootstrap resample of the pairs (Coste et al. 2023, arXiv 2310.02743, train theirs
the same way). They share the base and retrain the same top blocks, so the server runs the base once per item for
all of them (`app.model.family`). Eisenstein et al. 2023 (arXiv 2312.09244) found that members differing in their
pretraining seed help most: members of one base share the base's errors, which no fine-tuning seed removes.

An ensemble is judged as a reward model (accuracy, log-loss, ECE of its aggregate's margins) and by whether its
uncertainty means something: the spread of the members' margins on a pair, and accuracy by quartile of that spread
(it should fall as the spread grows)."""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Sequence
from typing import Any

from app.model.ensemble import Aggregate
from app.training.config import TrainConfig
from app.training.evaluate import evaluate_margins

MODELS_FILE = "models.toml"
QUANTILES = 4


def train_ensemble(config: TrainConfig, command: str) -> dict[str, Any]:
    """Trains `config.ensemble` members into OUTPUT/member<k> and writes OUTPUT/models.toml. The frozen blocks'
    features are computed once for all members (a feature cache under OUTPUT, removed after, unless
    --feature-cache names one to keep)."""
    from app.training.train import Trainer

    cache = config.feature_cache or config.output / "features"
    names, summaries = [], []
    for k in range(config.ensemble):
        member = config.model_copy(
            update={
                "ensemble": 1,
                "seed": config.seed + k,
                "bootstrap": True,
                "output": config.output / f"member{k}",
                "feature_cache": cache,
            }
        )
        summaries.append(Trainer(member).train(command))
        names.append(f"member{k}")
    if config.feature_cache is None:
        shutil.rmtree(cache, ignore_errors=True)
    (config.output / MODELS_FILE).write_text(models_toml(names))
    summary: dict[str, Any] = {
        "members": names,
        "best_epochs": [s["best_epoch"] for s in summaries],
        "train_seconds": sum(s["train_seconds"] for s in summaries),
        "models_file": str(config.output / MODELS_FILE),
    }
    if config.dev_file is not None:  # the ensemble on dev, as the server runs it (mean aggregate)
        report = dev_report(config, names)
        (config.output / "ensemble_eval.json").write_text(json.dumps(report, indent=2) + "\n")
        (config.output / "ensemble_eval.md").write_text("\n".join(ensemble_markdown(report)) + "\n")
        summary["dev"] = report["ensemble"]
    return summary


def dev_report(config: TrainConfig, names: list[str]) -> dict[str, Any]:
    from app.engine.offline import outputs_offline, score_offline
    from app.model.family import load_shared_base
    from app.model.loading import load_reward_model
    from app.training.data import load_pairs

    assert config.dev_file is not None
    pairs = load_pairs(config.dev_file, config.max_dev_pairs)
    inputs = [x for pair in pairs for x in pair.inputs()]
    paths = [config.output / name for name in names]
    fused = load_shared_base(names, paths, device="cpu")
    if fused is not None:
        rows = outputs_offline(fused, inputs)
        members = {name: [row[k] for row in rows] for k, name in enumerate(names)}
    else:
        apart = [load_reward_model(path, device="cpu") for path in paths]
        members = {name: score_offline(m, inputs) for name, m in zip(names, apart, strict=True)}
    mean = Aggregate()
    combined = [mean(list(rewards)) for rewards in zip(*members.values(), strict=True)]
    return ensemble_report(members, combined, mean.describe())


def models_toml(names: Sequence[str]) -> str:
    """A models file serving the members and their ensemble (paths relative to the file)."""
    lines = [
        "# written by reward-server train --ensemble: REWARD_MODELS_FILE=<this file> serves it",
        'default = "ensemble"',
        "",
    ]
    for name in names:
        lines += [f"[models.{name}]", f'path = "{name}"', ""]
    members = ", ".join(f'"{n}"' for n in names)
    lines += [
        "[ensembles.ensemble]",
        f"members = [{members}]",
        'aggregate = "mean"  # or min, uwo (lambda), softmin (beta)',
    ]
    return "\n".join(lines) + "\n"


def ensemble_report(members: dict[str, Sequence[float]], combined: Sequence[float], aggregate: str) -> dict[str, Any]:
    """`members`: each member's rewards for chosen0, rejected0, chosen1, ...; `combined`: the ensemble's (its
    `aggregate` of theirs). Metrics of each member, of the ensemble, and its accuracy by quartile of the members'
    disagreement on a pair."""
    margins = [c - r for c, r in zip(combined[0::2], combined[1::2], strict=True)]
    per_member = {
        name: [c - r for c, r in zip(rewards[0::2], rewards[1::2], strict=True)] for name, rewards in members.items()
    }
    spread = [statistics.pstdev(ms) for ms in zip(*per_member.values(), strict=True)]
    order = sorted(range(len(margins)), key=spread.__getitem__)
    bins = []
    for q in range(QUANTILES):
        inside = order[q * len(order) // QUANTILES : (q + 1) * len(order) // QUANTILES]
        if inside:
            bins.append(
                {
                    "quantile": q + 1,
                    "pairs": len(inside),
                    "spread_from": spread[inside[0]],
                    "spread_to": spread[inside[-1]],
                    "accuracy": sum(margins[i] > 0 for i in inside) / len(inside),
                }
            )
    wrong = [spread[i] for i in range(len(margins)) if margins[i] <= 0]
    right = [spread[i] for i in range(len(margins)) if margins[i] > 0]
    return {
        "aggregate": aggregate,
        "ensemble": evaluate_margins(margins).to_dict(),
        "members": {name: evaluate_margins(ms).to_dict() for name, ms in per_member.items()},
        "uncertainty": "the population standard deviation of the members' margins on a pair",
        "accuracy_by_uncertainty": bins,
        "mean_uncertainty": {
            "right": statistics.fmean(right) if right else None,
            "wrong": statistics.fmean(wrong) if wrong else None,
        },
    }


def ensemble_markdown(report: dict[str, Any]) -> list[str]:
    lines = [
        f"## Ensemble ({report['aggregate']})",
        "",
        "| model | accuracy | log-loss | ECE |",
        "|---|---:|---:|---:|",
    ]
    for name, m in [("ensemble", report["ensemble"]), *report["members"].items()]:
        lines.append(f"| {name} | {m['accuracy']:.3f} | {m['log_loss']:.3f} | {m['ece']:.3f} |")
    lines += [
        "",
        f"Accuracy by quartile of uncertainty ({report['uncertainty']}):",
        "",
        "| quartile | pairs | spread | accuracy |",
        "|---|---:|---|---:|",
    ]
    for b in report["accuracy_by_uncertainty"]:
        spread = f"{b['spread_from']:.3f}-{b['spread_to']:.3f}"
        lines.append(f"| {b['quantile']} | {b['pairs']} | {spread} | {b['accuracy']:.3f} |")
    return lines
