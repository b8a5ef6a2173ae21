"""`reward-server eval`: metrics against hand-computed values; in-process and over HTTP give the same report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from app.cli import main
from app.training.data import PreferencePair
from app.training.evaluate import evaluate, evaluate_margins, pearson, reliability


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


def test_eval_in_process_and_over_http_agree(checkpoints: dict[str, Path], live_server: str, tmp_path: Path) -> None:
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
    assert main(["eval", "--url", live_server, "--data", str(data), "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert a["fingerprint"] == b["fingerprint"]
    for key in ("accuracy", "mean_margin", "log_loss", "ece", "reward_length_correlation"):
        assert a["overall"][key] == pytest.approx(b["overall"][key], abs=1e-5), key
    assert set(a["by_dataset"]) == {"toy", "chat"}
    for name in ("reliability.png", "reward_distributions.png", "reward_vs_length.png"):
        assert (tmp_path / "a" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| overall | 9 |" in (tmp_path / "a" / "summary.md").read_text()
