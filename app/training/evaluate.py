"""`reward-server eval`: how well rewards order human preference pairs, and how they are calibrated and biased.

The scorer is any `list[ScoringInput] -> list[float]`: a checkpoint in-process or a running server over HTTP give
the same numbers. Writes `report.json`, `summary.md` and PNG plots.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.model.recipe import ScoringInput
from app.model.reward_model import sigmoid
from app.training.data import PreferencePair

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


def fit_temperature(margins: Sequence[float]) -> float:
    """The T minimizing the log-loss of sigmoid(margin / T) (golden-section search on log T)."""

    def nll(log_t: float) -> float:
        t = math.exp(log_t)
        return sum(math.log1p(math.exp(-m / t)) if m / t > -30 else -m / t for m in margins)

    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / (sx * sy) if sx and sy else 0.0


def _group_metrics(
    pairs: Sequence[PreferencePair], chosen: Sequence[float], rejected: Sequence[float]
) -> dict[str, Any]:
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    result = evaluate_margins(margins).to_dict()
    result["longer_wins"] = sum(len(p.chosen) > len(p.rejected) for p in pairs) / len(pairs)
    result["shorter_wins"] = sum(len(p.chosen) < len(p.rejected) for p in pairs) / len(pairs)
    lengths = [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]
    result["reward_length_correlation"] = pearson(list(chosen) + list(rejected), [float(n) for n in lengths])
    return result


def _example(pair: PreferencePair, index: int, margin: float) -> dict[str, Any]:
    return {"index": index, "prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, "margin": margin}


def evaluate(pairs: Sequence[PreferencePair], scorer: Scorer, batch: int = 256) -> dict[str, Any]:
    """Scores every pair's two sides and reports overall and per-`dataset` metrics beside the length baselines."""
    inputs = [x for pair in pairs for x in pair.inputs()]
    rewards: list[float] = []
    for start in range(0, len(inputs), batch):
        rewards += scorer(inputs[start : start + batch])
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
    lines += ["", "Plots: `reliability.png`, `reward_distributions.png`, `reward_vs_length.png`.", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path, title: str) -> None:
    """report.json (without the raw reward lists), summary.md and three PNG plots."""
    out.mkdir(parents=True, exist_ok=True)
    compact = {k: v for k, v in report.items() if k not in ("rewards", "lengths")}
    (out / "report.json").write_text(json.dumps(compact, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(report, title))
    _plots(report, out)


def _plots(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = report["reliability"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar(
        [b["lo"] for b in table],
        [b["frequency"] for b in table],
        width=0.1,
        align="edge",
        alpha=0.6,
        edgecolor="black",
        label="observed frequency",
    )
    ax.plot([b["confidence"] for b in table], [b["frequency"] for b in table], "o-", color="C1", label="bin mean")
    ax.set(
        xlabel="predicted P(preferred) = sigmoid(r_a - r_b)",
        ylabel="observed frequency",
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"Reliability (ECE {report['overall']['ece']:.3f})",
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)

    chosen, rejected = report["rewards"]["chosen"], report["rewards"]["rejected"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(chosen, bins=40, alpha=0.55, label="chosen", color="C2")
    ax.hist(rejected, bins=40, alpha=0.55, label="rejected", color="C3")
    ax.set(xlabel="reward", ylabel="pairs", title=f"Rewards (accuracy {report['overall']['accuracy']:.3f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reward_distributions.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(report["lengths"]["chosen"], chosen, s=6, alpha=0.5, label="chosen", color="C2")
    ax.scatter(report["lengths"]["rejected"], rejected, s=6, alpha=0.5, label="rejected", color="C3")
    ax.set_xscale("log")
    corr = report["overall"]["reward_length_correlation"]
    ax.set(xlabel="response length (characters)", ylabel="reward", title=f"Reward vs length (r = {corr:.2f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reward_vs_length.png", dpi=110)
    plt.close(fig)
