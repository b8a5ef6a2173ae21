"""`reward-server eval`: how well rewards order human preference pairs, and how they are calibrated and biased.

The scorer is any `list[ScoringInput] -> list[float]`: a checkpoint in-process or a running server over HTTP give
the same numbers. Writes `report.json`, `summary.md` and PNG plots (`plots`); the reward-hacking figures
are `hacking`'s.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from app.model.recipe import ScoringInput
from app.model.reward_model import sigmoid
from app.training.data import PreferencePair
from app.training.hacking import hacking_markdown, length_section, rates
from app.training.plots import PLOTS, plot_report

Scorer = Callable[[list[ScoringInput]], list[float]]


def reliability(margins: Sequence[float], bins: int = 10) -> list[dict[str, float]]:
    """Bins of predicted P(first preferred) vs how often it was, on the symmetric form: each pair counts as
    (sigmoid(m), chosen won) and (1 - sigmoid(m), rejected lost), so the diagram does not depend on pair order."""
    points = [(sigmoid(m), 1.0) for m in margins] + [(1 - sigmoid(m), 0.0) for m in margins]
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(p, y) for p, y in points if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if inside:
            out.append(
                {
                    "lo": lo,
                    "hi": hi,
                    "confidence": sum(p for p, _ in inside) / len(inside),
                    "frequency": sum(y for _, y in inside) / len(inside),
                    "count": float(len(inside)),
                }
            )
    return out


@dataclass
class EvalResult:
    pairs: int
    accuracy: float  # chosen strictly higher
    mean_margin: float
    log_loss: float
    ece: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def evaluate_margins(margins: Sequence[float], bins: int = 10) -> EvalResult:
    """Accuracy, mean margin, log-loss and expected calibration error of P(chosen) = sigmoid(margin)."""
    n = len(margins)
    table = reliability(margins, bins)
    total = sum(b["count"] for b in table)
    return EvalResult(
        pairs=n,
        accuracy=sum(m > 0 for m in margins) / n,
        mean_margin=sum(margins) / n,
        log_loss=-sum(math.log(max(sigmoid(m), 1e-12)) for m in margins) / n,
        ece=sum(b["count"] / total * abs(b["confidence"] - b["frequency"]) for b in table),
    )


def neg_log_sigmoid(x: float) -> float:
    """-log sigmoid(x), without overflow: the Bradley-Terry loss of one pair at logit x."""
    return math.log1p(math.exp(-x)) if x > -30 else -x


def golden_section(f: Callable[[float], float], lo: float, hi: float, steps: int = 60) -> float:
    """The minimum of a unimodal `f` on [lo, hi]."""
    g = (math.sqrt(5) - 1) / 2
    for _ in range(steps):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        lo, hi = (lo, b) if f(a) < f(b) else (a, hi)
    return (lo + hi) / 2


def fit_temperature(margins: Sequence[float]) -> float:
    """The T minimizing the log-loss of sigmoid(margin / T) (golden-section search on log T)."""

    def nll(log_t: float) -> float:
        t = math.exp(log_t)
        return sum(neg_log_sigmoid(m / t) for m in margins)

    return math.exp(golden_section(nll, math.log(0.05), math.log(20.0)))


def _group_metrics(
    pairs: Sequence[PreferencePair], chosen: Sequence[float], rejected: Sequence[float]
) -> dict[str, Any]:
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    result = evaluate_margins(margins).to_dict()
    baselines = rates(pairs, margins)
    result["longer_wins"], result["shorter_wins"] = baselines["longer_wins"], baselines["shorter_wins"]
    result["reward_hacking"] = length_section(pairs, chosen, rejected)
    result["reward_length_correlation"] = result["reward_hacking"]["reward_length_correlation"]
    return result


def _example(pair: PreferencePair, index: int, margin: float) -> dict[str, Any]:
    return {"index": index, "prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, "margin": margin}


def evaluate(
    pairs: Sequence[PreferencePair], scorer: Scorer, batch: int = 64, progress: bool = False
) -> dict[str, Any]:
    """Scores every pair's two sides, `batch` pairs per call to `scorer`, and reports overall and per-`dataset`
    metrics beside the length baselines. `progress`: a bar on stderr (pairs/s, ETA)."""
    rewards: list[float] = []
    with tqdm(total=len(pairs), unit="pair", desc="scoring", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            rewards += scorer([x for pair in chunk for x in pair.inputs()])
            bar.update(len(chunk))
    chosen, rejected = rewards[0::2], rewards[1::2]
    by_dataset: dict[str, Any] = {}
    for name in sorted({p.dataset for p in pairs}):
        idx = [i for i, p in enumerate(pairs) if p.dataset == name]
        by_dataset[name or "unlabelled"] = _group_metrics(
            [pairs[i] for i in idx], [chosen[i] for i in idx], [rejected[i] for i in idx]
        )
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    confident = sorted(range(len(pairs)), key=lambda i: -abs(margins[i]))
    right = [i for i in confident if margins[i] > 0][:10]
    wrong = [i for i in confident if margins[i] < 0][:10]
    return {
        "overall": _group_metrics(pairs, chosen, rejected),
        # line indices (0-based) into the data file of the most confident right and wrong orderings, for spot checks;
        # the first few with their text, so the report checks its model without the data file
        "examples": {"right": right, "wrong": wrong},
        "example_pairs": {
            "right": [_example(pairs[i], i, margins[i]) for i in right[:5]],
            "wrong": [_example(pairs[i], i, margins[i]) for i in wrong[:3]],
        },
        "by_dataset": by_dataset,
        "reliability": reliability([c - r for c, r in zip(chosen, rejected, strict=True)]),
        "rewards": {"chosen": chosen, "rejected": rejected},
        "lengths": {"chosen": [len(p.chosen) for p in pairs], "rejected": [len(p.rejected) for p in pairs]},
    }


def summary_markdown(report: dict[str, Any], title: str) -> str:
    rows = [("overall", report["overall"]), *report["by_dataset"].items()]
    lines = [
        f"# {title}",
        "",
        "| data | pairs | accuracy | longer wins | shorter wins | mean margin | log-loss | ECE | corr(r, length) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['pairs']} | {m['accuracy']:.3f} | {m['longer_wins']:.3f} | {m['shorter_wins']:.3f} | "
            f"{m['mean_margin']:.3f} | {m['log_loss']:.3f} | {m['ece']:.3f} | {m['reward_length_correlation']:.3f} |"
        )
    lines += ["", *hacking_markdown([(name, m["reward_hacking"]) for name, m in rows])]
    if "ensemble" in report:  # an ensemble's members and its accuracy by uncertainty
        from app.training.ensemble import ensemble_markdown

        lines += ["", *ensemble_markdown(report["ensemble"])]
    lines += ["", f"Plots: {', '.join(f'`{name}`' for name in PLOTS)}.", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path, title: str) -> None:
    """report.json (without the raw reward lists), summary.md and three PNG plots."""
    out.mkdir(parents=True, exist_ok=True)
    compact = {k: v for k, v in report.items() if k not in ("rewards", "lengths")}
    (out / "report.json").write_text(json.dumps(compact, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(report, title))
    plot_report(report, out)
