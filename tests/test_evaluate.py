"""`reward-server eval`: metrics against hand-computed values; in-process and over HTTP give the same report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from app.cli import main
from app.training.data import PreferencePair
from app.training.evaluate import evaluate, evaluate_margins, reliability, summary_markdown
from app.training.hacking import pearson
from app.training.plots import PLOTS


def test_metrics_by_hand() -> None:
    result = evaluate_margins([2.0, 1.0, -1.0, 0.0])
    assert result.accuracy == 0.5  # a tie is not a win
    assert result.mean_margin == 0.5
    sig = [1 / (1 + math.exp(-m)) for m in (2.0, 1.0, -1.0, 0.0)]
    assert result.log_loss == pytest.approx(-sum(math.log(p) for p in sig) / 4)
    perfect = [0.0] * 10  # P = 0.5 for every pair: perfectly calibrated in the symmetric form
    assert evaluate_margins(perfect).ece == pytest.approx(0.0)
    assert sum(b["count"] for b in reliability([3.0, -3.0])) == 4
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)


def test_evaluate_reports_baselines_and_datasets() -> None:
    pairs = [
        PreferencePair("p", "long good answer", "bad", dataset="a"),
        PreferencePair("p", "ok", "much longer bad answer", dataset="a"),
        PreferencePair("p", "good", "bad answer", dataset="b"),
    ]
    reward = {
        "long good answer": 2.0,
        "bad": 0.0,
        "ok": 1.0,
        "much longer bad answer": 0.5,
        "good": 0.0,
        "bad answer": 1.0,
    }
    report = evaluate(pairs, lambda inputs: [reward[x.response] for x in inputs])
    assert report["overall"]["accuracy"] == pytest.approx(2 / 3)
    assert report["overall"]["longer_wins"] == pytest.approx(1 / 3)
    assert report["overall"]["shorter_wins"] == pytest.approx(2 / 3)
    assert report["by_dataset"]["a"]["accuracy"] == 1.0 and report["by_dataset"]["b"]["accuracy"] == 0.0


def test_a_length_judge_is_caught_by_the_reward_hacking_section() -> None:
    """A reward that is the reply's length: right on every pair whose chosen reply is longer, wrong on every other;
    length-controlled accuracy sits with the "longer wins" baseline, not with its raw accuracy."""
    pairs = [PreferencePair("p", "x" * (10 * k), "x" * (10 * k + 40 * k)) for k in range(1, 5)]  # chosen shorter
    pairs += [PreferencePair("p", "x" * (55 + k), "x" * 50) for k in range(6)]  # chosen 1.1-1.2x longer
    pairs += [PreferencePair("p", "x" * 150, "x" * 100), PreferencePair("p", "x" * 300, "x" * 100)]  # 1.5x, 3x
    report = evaluate(pairs, lambda inputs: [float(len(x.response)) for x in inputs])
    h = report["overall"]["reward_hacking"]
    assert report["overall"]["accuracy"] == pytest.approx(8 / 12)
    assert h["chosen_shorter"] == {"pairs": 4, "accuracy": 0.0, "longer_wins": 0.0, "shorter_wins": 1.0}
    assert h["chosen_longer"] == {"pairs": 8, "accuracy": 1.0, "longer_wins": 1.0, "shorter_wins": 0.0}
    # bins: < 0.5x (4 pairs), 0.5-0.79x (none), about as long (under 1.26x: 6), 1.26-2x (1), > 2x (1)
    assert [b["pairs"] for b in h["ratio_bins"]] == [4, 0, 6, 1, 1]
    assert h["length_controlled"]["accuracy"] == pytest.approx((0 + 1 + 1 + 1) / 4)
    assert h["length_controlled"]["accuracy"] == h["length_controlled"]["longer_wins"]
    assert h["reward_length_correlation"] == pytest.approx(1.0)
    assert h["margin_length_difference_correlation"] == pytest.approx(1.0)
    assert report["overall"]["reward_length_correlation"] == h["reward_length_correlation"]


def test_a_content_judge_is_right_on_both_halves() -> None:
    good = {"right", "a right and longer reply", "ok"}
    pairs = [
        PreferencePair("p", "right", "a wrong and longer reply", dataset="a"),
        PreferencePair("p", "a right and longer reply", "wrong", dataset="a"),
        PreferencePair("p", "ok", "no", dataset="b"),  # as long: in neither half
    ]
    report = evaluate(pairs, lambda inputs: [1.0 if x.response in good else 0.0 for x in inputs])
    h = report["overall"]["reward_hacking"]
    assert h["chosen_shorter"]["accuracy"] == h["chosen_longer"]["accuracy"] == 1.0
    assert h["chosen_shorter"]["pairs"] + h["chosen_longer"]["pairs"] == 2
    assert report["by_dataset"]["b"]["reward_hacking"]["chosen_shorter"]["accuracy"] is None
    assert h["length_controlled"]["accuracy"] == 1.0 and h["length_controlled"]["longer_wins"] == pytest.approx(1 / 3)
    markdown = summary_markdown(report, "t")
    assert "## Reward hacking: length" in markdown and "| b | - (0) | - (0) | 1.000 |" in markdown


def test_eval_in_process_and_over_http_agree(
    checkpoints: dict[str, Path], live_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {
            "prompt": "Human: What is the capital of France?",
            "chosen": "Paris.",
            "rejected": "Madrid, I think.",
            "dataset": "toy",
        },
        {
            "prompt": "Write a short poem about the sea.",
            "chosen": "The wind and the stars.",
            "rejected": "No.",
            "dataset": "toy",
        },
        {
            "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}],
            "dataset": "chat",
        },
    ] * 3
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "--model", str(checkpoints["llama"]), "--data", str(data), "--out", str(tmp_path / "a")]) == 0
    progress = capsys.readouterr().err  # the bar: pairs done, their rate
    assert "scoring: 100%" in progress and "9/9" in progress and "pair/s" in progress
    assert main(["eval", "--url", live_server, "--data", str(data), "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert a["fingerprint"] == b["fingerprint"]
    for key in ("accuracy", "mean_margin", "log_loss", "ece", "reward_length_correlation"):
        assert a["overall"][key] == pytest.approx(b["overall"][key], abs=1e-5), key
    assert set(a["by_dataset"]) == {"toy", "chat"}
    ha, hb = a["overall"]["reward_hacking"], b["overall"]["reward_hacking"]
    assert ha["chosen_shorter"] == hb["chosen_shorter"] and ha["ratio_bins"] == hb["ratio_bins"]
    for key in ("reward_length_correlation", "margin_length_difference_correlation"):
        assert ha[key] == pytest.approx(hb[key], abs=1e-5), key
    for name in PLOTS:
        assert (tmp_path / "a" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| overall | 9 |" in (tmp_path / "a" / "summary.md").read_text()
    # another context than the checkpoint's: the items are read cut to it, and the report says which it used
    short = ["--max-length", "8", "--out", str(tmp_path / "c")]
    assert main(["eval", "--model", str(checkpoints["llama"]), "--data", str(data), *short]) == 0
    c = json.loads((tmp_path / "c" / "report.json").read_text())
    assert (a["max_length"], c["max_length"]) == (b["max_length"], 8) and a["max_length"] > 8
    assert c["overall"]["mean_margin"] != pytest.approx(a["overall"]["mean_margin"], abs=1e-6)
    with pytest.raises(SystemExit, match="--max-length applies to --model"):
        main(["eval", "--url", live_server, "--data", str(data), *short])
