"""`reward-server train --ensemble K`: members differing by seed and bootstrap, a models file that serves them as
one shared-base ensemble, and the ensemble's evaluation (accuracy by uncertainty)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaModel

from app.server.models_file import ModelsFile
from app.training.config import TrainConfig
from app.training.ensemble import ensemble_report, train_ensemble
from tests import tiny
from tests.conftest import serving


def write_pairs(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    good = ["Paris is the capital.", "It is Paris, on the Seine.", "Paris."]
    bad = ["I cannot help with that.", "No idea, sorry.", "Berlin, I think."]
    rows = [
        {"prompt": f"What is the capital of France? ({i})", "chosen": rng.choice(good), "rejected": rng.choice(bad)}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_members_differ_and_are_served_as_one_shared_base_ensemble(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tokenizer = tiny.byte_level_tokenizer(bos=True, chat=True)
    LlamaModel(tiny.llama_config(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    config = TrainConfig(
        base_model=str(tmp_path / "base"),
        train_file=write_pairs(tmp_path / "train.jsonl", 24, 0),
        dev_file=write_pairs(tmp_path / "dev.jsonl", 12, 1),
        output=tmp_path / "ens",
        top_k=1,
        epochs=1,
        batch_pairs=4,
        max_length=64,
        ensemble=3,
    )
    summary = train_ensemble(config, "test")
    assert summary["members"] == ["member0", "member1", "member2"]
    recorded = [json.loads((config.output / m / "reward_manifest.json").read_text()) for m in summary["members"]]
    assert [r["extra"]["train_config"]["seed"] for r in recorded] == [0, 1, 2]
    assert all(r["extra"]["train_config"]["bootstrap"] for r in recorded)
    assert not (config.output / "features").exists()  # the shared feature cache is removed after
    report = json.loads((config.output / "ensemble_eval.json").read_text())
    assert sum(b["pairs"] for b in report["accuracy_by_uncertainty"]) == 12
    assert set(report["members"]) == set(summary["members"]) and 0 <= report["ensemble"]["accuracy"] <= 1

    spec = ModelsFile.read(config.output / "models.toml")  # paths relative to the file
    assert [e.path for e in spec.models.values()] == [config.output / m for m in summary["members"]]
    items = [{"prompt": "What is the capital of France?", "response": r} for r in ("Paris.", "No idea, sorry.")]
    workers, body = serve_ensemble(config.output / "models.toml", items)
    assert workers == 1  # one base, run once per item for the three members
    assert len({tuple(i["members"].values()) for i in body["items"]}) == 2
    assert len(set(body["items"][0]["members"].values())) == 3  # seeds and bootstraps made them differ


def serve_ensemble(models_file: Path, items: list[dict[str, str]]) -> tuple[int, dict[str, Any]]:
    """The server's model threads for `models_file`, and its default's answer for `items`."""

    async def run() -> tuple[int, dict[str, Any]]:
        async with serving(models_file.parent / "member0", models_file=models_file) as (app, client):
            body = (await client.post("/score", json={"items": items})).json()
            return len(app.state.registry.workers), body

    return asyncio.run(run())


def test_accuracy_falls_where_the_members_disagree() -> None:
    """Pairs 0-5 the members agree on and rank right; pairs 6-7 they split on, and the mean ranks them wrong."""
    agree = [[1.0, 0.0]] * 6
    split_pairs = [[0.0, 1.5]] * 2
    members = {
        "a": [x for pair in agree + split_pairs for x in pair],
        "b": [x for pair in agree + [[1.0, 0.5]] * 2 for x in pair],
    }
    combined = [(a + b) / 2 for a, b in zip(members["a"], members["b"], strict=True)]
    report = ensemble_report(members, combined, "mean")
    bins = report["accuracy_by_uncertainty"]
    assert [b["pairs"] for b in bins] == [2, 2, 2, 2]
    assert bins[0]["accuracy"] == 1.0 and bins[-1]["accuracy"] == 0.0
    assert report["ensemble"]["accuracy"] == pytest.approx(6 / 8)
    assert report["members"]["b"]["accuracy"] == 1.0
    assert report["mean_uncertainty"]["wrong"] > report["mean_uncertainty"]["right"]


def test_eval_of_a_served_ensemble_reports_its_members(tmp_path: Path) -> None:
    """`reward-server eval --url --name`: the members each answer carries become the ensemble's section."""
    from types import SimpleNamespace

    from app.training.data import PreferencePair
    from app.training.evaluate import write_report
    from app.training.sources import server_report

    def score(items: list[tuple[str, str]]) -> SimpleNamespace:
        out = []
        for _, response in items:  # member a prefers long replies, b short ones
            a, b = float(len(response)), -float(len(response))
            out.append(SimpleNamespace(reward=(a + b) / 2 + 0.1 * a, members={"a": a, "b": b}))
        return SimpleNamespace(rewards=[i.reward for i in out], items=out)

    info = {"max_length": 64, "fingerprint": "f", "versions": {}, "model_fingerprint": "m", "kernels": {}}
    pairs = [PreferencePair(f"q{i}", "a long reply" * (i + 1), "short") for i in range(8)]
    report = server_report(pairs, score, lambda: info, "both")
    assert report["ensemble"]["members"]["a"]["accuracy"] == 1.0 and report["ensemble"]["members"]["b"]["accuracy"] == 0
    assert report["ensemble"]["ensemble"]["accuracy"] == report["overall"]["accuracy"] == 1.0
    write_report(report, tmp_path, "t")
    assert "Accuracy by quartile of uncertainty" in (tmp_path / "summary.md").read_text()
