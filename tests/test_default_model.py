"""The shipped default model: it loads from models/default (rebuilding its backbone from the installed package) and
orders the pairs its committed eval report names (their text is in the report: no data file needed) as the report
says, with the same margins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.engine.offline import served_fingerprint
from app.model.loading import load_reward_model
from app.model.recipe import ScoringInput

pytestmark = pytest.mark.slow  # the shipped 135M-parameter model, loaded and scored

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "models" / "default"


def test_default_model_orders_the_reports_pairs_as_the_report_says() -> None:
    report = json.loads((DEFAULT / "eval" / "report.json").read_text())
    model = load_reward_model(DEFAULT, device="cpu")
    assert model.info.dtype == "float32"  # what it was trained in, whatever the CPU
    if model.info.versions == report["versions"]:  # else the fingerprint rightly differs: kernels may have moved
        assert model.info.model_fingerprint == report["model_fingerprint"]  # the committed files are the evaluated ones
        if model.prepare().model_dump() == report["kernels"]:  # the linears' calls are measured on this CPU
            assert served_fingerprint(model) == report["fingerprint"]
    assert model.info.recipe["template"] == "chat" and (model.info.base_model or "").startswith("smollm2-135m-instruct")
    examples = report["example_pairs"]
    assert len(examples["right"]) == 5 and len(examples["wrong"]) == 3
    for side in ("right", "wrong"):
        for pair in examples[side]:
            encoded = model.encoder.encode_batch(
                [ScoringInput(pair["prompt"], pair[k]) for k in ("chosen", "rejected")]
            )
            chosen, rejected = model.score(encoded)
            assert (chosen > rejected) == (side == "right"), pair["index"]
            assert chosen - rejected == pytest.approx(pair["margin"], abs=1e-4)
