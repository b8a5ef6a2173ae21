"""The shipped default model: it loads from models/default (rebuilding its backbone from the installed package) and
prefers the chosen reply on dev pairs that its committed eval report says it orders right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.engine.offline import offline_fingerprint
from app.model.loading import load_reward_model
from app.training.data import load_pairs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "models" / "default"
DEV = ROOT.parent / "shared" / "data" / "preferences" / "dev.jsonl"


@pytest.mark.skipif(not DEV.exists(), reason=f"the dev pairs ({DEV}) come with ../shared, which a user's clone lacks")
def test_default_model_prefers_the_chosen_reply() -> None:
    report = json.loads((DEFAULT / "eval" / "report.json").read_text())
    model = load_reward_model(DEFAULT, device="cpu")
    assert model.info["dtype"] == "float32"  # what it was trained in, whatever the CPU
    if model.info["versions"] == report["versions"]:  # else the fingerprint rightly differs: kernels may have moved
        assert offline_fingerprint(model) == report["fingerprint"]  # the committed files are the evaluated ones
    assert model.info["recipe"]["template"] == "chat" and model.info["base_model"].startswith("smollm2-135m-instruct")
    pairs = load_pairs(DEV)
    right = report["examples"]["right"][:5]
    assert len(right) == 5
    for i in right:
        chosen, rejected = model.score(model.encoder.encode_batch(list(pairs[i].inputs())))
        assert chosen > rejected, (i, chosen, rejected)
    wrong = report["examples"]["wrong"][0]  # and the report is honest about what it gets wrong
    chosen, rejected = model.score(model.encoder.encode_batch(list(pairs[wrong].inputs())))
    assert chosen < rejected
