"""`reward-server train --prm` and `eval --prm`, on generated step-labelled data (no such data ships here): the three
JSONL forms read as documented, the metrics on a hand-made case, and a tiny PRM that learns which steps are wrong,
then serves the step rewards its training measured."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from app.training.prm import Solution, parse_solution, prm_metrics
from tests.conftest import serving


def generated(count: int, seed: int) -> list[dict[str, object]]:
    """Sums worked in steps; from the first wrong step on, every step is labelled wrong (math-shepherd's rule). A
    wrong step says so in its words ("I guess"), so a tiny model can learn it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        wrong_at = rng.choice([None, 0, 1, 2])
        steps, labels, bad = [], [], False
        for n, (x, y) in enumerate([(a, b), (a + b, c), (a + b + c, 0)]):
            bad = bad or wrong_at == n
            total = x + y + (3 if bad else 0)
            steps.append(f"{x} + {y} = {total}" + (", I guess." if bad else ", for sure."))
            labels.append(0 if bad else 1)
        rows.append({"prompt": f"What is {a} + {b} + {c}?", "steps": steps, "labels": labels})
    return rows


def test_the_three_forms_are_read_as_documented() -> None:
    plain = parse_solution({"prompt": "q", "steps": ["a", "b"], "labels": [1, 0]}, "x")
    assert plain == Solution("q", ("a", "b"), (1, 0))
    shepherd = parse_solution(
        {
            "input": "What is 2+2? Step 1: 2+2=4. ки\nStep 2: So 5. ки",
            "label": "What is 2+2? Step 1: 2+2=4. +\nStep 2: So 5. -",
        },
        "x",
    )
    assert shepherd == Solution("What is 2+2?", ("Step 1: 2+2=4.", "Step 2: So 5."), (1, 0))
    prm800k = {
        "question": {"problem": "2+2?"},
        "label": {
            "steps": [
                {"completions": [{"text": "2+2=4", "rating": 1}], "chosen_completion": 0},
                {"completions": [{"text": "hmm", "rating": 0}, {"text": "x", "rating": -1}], "chosen_completion": None},
                {"completions": [{"text": "so 5", "rating": -1}], "chosen_completion": 0},
                {"completions": [{"text": "unrated", "rating": None}], "chosen_completion": None},
            ]
        },
    }
    assert parse_solution(prm800k, "x") == Solution("2+2?", ("2+2=4", "hmm", "so 5"), (1, 1, 0))


def test_metrics_on_a_hand_made_case() -> None:
    solutions = [Solution("q", ("a", "b", "c"), (1, 0, 0)), Solution("q", ("a", "b"), (1, 1))]
    got = prm_metrics([[0.9, 0.2, 0.7], [0.8, 0.3]], solutions)
    assert got["step_accuracy"] == pytest.approx(3 / 5)  # 0.9, 0.2, 0.8 right; 0.7, 0.3 wrong
    assert got["error_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))  # found b; c missed; the 2nd's b false
    assert got["first_error_accuracy_erroneous"] == 1.0 and got["first_error_accuracy_correct"] == 0.0
    assert got["processbench_f1"] == 0.0


@pytest.mark.parametrize("mode", ["full", "top_k"])
def test_a_problems_solutions_share_a_row_and_read_as_each_alone(
    checkpoints: dict[str, Path], tmp_path: Path, mode: str
) -> None:
    """Training's rows ([prompt | solution 1 | solution 2 | ...], each solution seeing the prompt and itself; top_k:
    the frozen blocks' states of the row computed once) give every step the logit a plain forward of that solution
    alone gives."""
    import torch

    from app.model.collate import collate
    from app.training.config import TrainConfig
    from app.training.prm import PRMTrainer, rows_of

    config = TrainConfig(
        base_model=str(checkpoints["value_head"] / "base"),
        train_file=tmp_path / "t",
        output=tmp_path / "o",
        mode=mode,
        prm=True,
        max_length=128,
    )
    trainer = PRMTrainer(config)
    assert (trainer.split is not None) == (mode == "top_k")
    rows = generated(4, 3)
    solutions = [parse_solution({**r, "prompt": "What is the sum?"}, "x") for r in rows[:3]] + [
        parse_solution(rows[3], "x")
    ]
    kept, encoded = trainer.fitting(solutions)
    shared = rows_of(encoded, 4096)
    assert len(kept) == 4 and sorted(len(r.parts) for r in shared) == [1, 3]
    trainer.cache(shared)
    assert all((r.features is not None) == (mode == "top_k") for r in shared)
    together = trainer.probabilities(shared, 4)
    for item, got in zip(encoded, together, strict=True):
        b = collate([item], trainer.pad_id)
        reads = (torch.zeros(len(item.reads), dtype=torch.long), torch.tensor(item.reads))
        with torch.no_grad():
            alone = torch.sigmoid(trainer.module(b.input_ids, b.attention_mask, b.position_ids, None, reads)[:, 0])
        assert got == pytest.approx(alone.tolist(), abs=1e-6)


async def test_a_trained_prm_finds_wrong_steps_and_serves_what_it_measured(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from app.cli import main

    for name, rows in (("train", generated(240, 0)), ("dev", generated(60, 1))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prm"
    args = ["train", "--prm", "--base-model", str(checkpoints["value_head"] / "base"), "--mode", "full"]
    args += ["--train-file", str(tmp_path / "train.jsonl"), "--dev-file", str(tmp_path / "dev.jsonl")]
    args += ["--output", str(out), "--epochs", "4", "--lr", "1e-3", "--head-lr", "1e-2", "--max-length", "128"]
    assert main(args) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    dev = summary["history"][summary["best_epoch"] - 1]
    labels = [x for r in generated(60, 1) for x in r["labels"]]  # type: ignore[attr-defined]
    majority = max(labels.count(0), labels.count(1)) / len(labels)
    assert dev["dev_step_accuracy"] > majority + 0.1, (dev, majority)
    manifest = json.loads((out / "reward_manifest.json").read_text())
    assert manifest["steps"] == {**manifest["steps"], "tag": "\n", "read": "sigmoid"}
    assert (
        main(
            ["eval", "--prm", "--model", str(out), "--data", str(tmp_path / "dev.jsonl"), "--out", str(tmp_path / "ev")]
        )
        == 0
    )
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["step_accuracy"] == pytest.approx(dev["dev_step_accuracy"], abs=1e-9)
    assert report["processbench_f1"] == pytest.approx(dev["dev_processbench_f1"], abs=1e-9)
    row = generated(60, 1)[0]
    async with serving(out, dtype="float32") as (_, client):
        served = (
            await client.post("/score", json={"items": [{"prompt": row["prompt"], "steps": row["steps"]}]})
        ).json()
    assert len(served["items"][0]["step_rewards"]) == 3
