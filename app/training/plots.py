"""The eval report's plots: calibration, reward distributions, reward vs length, accuracy by length ratio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOTS = ("reliability.png", "reward_distributions.png", "reward_vs_length.png", "reward_hacking.png")


def plot_report(report: dict[str, Any], out: Path) -> None:
    """Every plot in `PLOTS`, into `out`."""
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

    _hacking_plot(report, out / "reward_hacking.png", plt)


def _hacking_plot(report: dict[str, Any], path: Path, plt: Any) -> None:
    """Accuracy per length-ratio bin beside "longer wins": a length judge's bars follow the baseline's."""
    bins = report["overall"]["reward_hacking"]["ratio_bins"]
    names = ["< 0.5x", "0.5-0.8x", "0.8-1.26x", "1.26-2x", "> 2x"][: len(bins)]
    xs = range(len(bins))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    model = [b["accuracy"] or 0.0 for b in bins]
    longer = [b["longer_wins"] or 0.0 for b in bins]
    ax.bar([x - 0.2 for x in xs], model, width=0.4, label="this model", color="C0")
    ax.bar([x + 0.2 for x in xs], longer, width=0.4, label="longer wins", color="C7")
    for x, b in zip(xs, bins, strict=True):
        ax.annotate(str(b["pairs"]), (x, 1.03), ha="center", fontsize=8)
    ax.axhline(0.5, ls="--", color="grey", lw=0.8)
    controlled = report["overall"]["reward_hacking"]["length_controlled"]["accuracy"]
    ax.set_xticks(list(xs), names)
    ax.set(
        xlabel="chosen length / rejected length (pairs above each bar)",
        ylabel="accuracy",
        ylim=(0, 1.3),
        title=f"Accuracy by length ratio (length-controlled {controlled or 0:.3f})",
    )
    ax.legend(loc="upper center", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
