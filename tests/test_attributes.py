"""Multi-attribute heads: every output is served by its label, the reward is the weighted sum the card recommends
(setting or manifest), and REWARD_HEAD_INDEX stays the one-output case."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from app.model.checkpoint import CheckpointError
from app.model.export import export_seq_cls
from app.model.loading import load_reward_model
from app.model.recipe import ScoringInput
from tests.conftest import direct, serving

ITEMS = [{"prompt": "What is 2+2?", "response": "4"}, {"prompt": "Say hi", "response": "Hello there, friend!"}]
LABELS = {"0": "helpfulness", "1": "correctness", "2": "verbosity"}
WEIGHTS = {"helpfulness": 0.65, "correctness": 0.8, "verbosity": -0.5}


@pytest.fixture(scope="module")
def attributed(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 3-output head with named labels and the weights in its manifest, as a card would recommend them."""
    path = shutil.copytree(checkpoints["llama_3labels"], tmp_path_factory.mktemp("attr") / "m")
    config = json.loads((path / "config.json").read_text())
    config["id2label"], config["label2id"] = LABELS, {v: int(k) for k, v in LABELS.items()}
    (path / "config.json").write_text(json.dumps(config))
    manifest = {"format": "seq_cls", "attribute_weights": WEIGHTS}
    (path / "reward_manifest.json").write_text(json.dumps(manifest))
    return path


def logits(path: Path) -> list[list[float]]:
    """The independent reference: the checkpoint's own forward, item by item."""
    model = load_reward_model(path, dtype="float32", device="cpu", head_index=0)
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    for item in ITEMS:
        ids = model.encoder.encode(ScoringInput(item["prompt"], item["response"])).input_ids
        with torch.no_grad():
            out.append(hf(input_ids=torch.tensor([ids])).logits[0].tolist())
    return out


async def test_attributes_by_label_and_the_reward_their_weighted_sum(attributed: Path) -> None:
    want = logits(attributed)
    async with serving(attributed) as (_, client):
        body = (await client.post("/score", json={"items": ITEMS})).json()
        info = (await client.get("/info")).json()
    assert info["attributes"] == list(WEIGHTS) and info["head_index"] is None
    for item, row in zip(body["items"], want, strict=True):
        assert list(item["attributes"]) == list(WEIGHTS)
        assert list(item["attributes"].values()) == pytest.approx(row, abs=1e-5)
        assert item["reward"] == math.fsum(WEIGHTS[k] * v for k, v in item["attributes"].items())
    async with serving(attributed, attribute_weights={"correctness": 1.0}) as (_, client):  # the setting wins
        only = (await client.post("/score", json={"items": ITEMS})).json()
    assert only["rewards"] == [i["attributes"]["correctness"] for i in body["items"]]
    assert only["fingerprint"] != body["fingerprint"]


async def test_head_index_is_the_one_output_case(checkpoints: dict[str, Path], make_client: Any) -> None:
    want = logits(checkpoints["llama_3labels"])
    async with serving(checkpoints["llama_3labels"], head_index=2) as (_, client):
        body = (await client.post("/score", json={"items": ITEMS})).json()
    assert body["rewards"] == pytest.approx([row[2] for row in want], abs=1e-5)
    assert [list(i["attributes"]) for i in body["items"]] == [["LABEL_0", "LABEL_1", "LABEL_2"]] * 2
    async with make_client("llama") as client:  # a plain reward head reports no attributes
        assert "attributes" not in (await client.post("/score", json={"items": ITEMS})).json()["items"][0]


def test_unusable_weights_are_refused_naming_the_labels(attributed: Path) -> None:
    with pytest.raises(CheckpointError, match=r"name \['honesty'\].*helpfulness"):
        load_reward_model(attributed, dtype="float32", device="cpu", attribute_weights={"honesty": 1.0})
    with pytest.raises(CheckpointError, match="not both"):
        load_reward_model(attributed, dtype="float32", device="cpu", head_index=0, attribute_weights={"verbosity": 1})


def test_export_folds_the_weighted_sum_into_one_output(attributed: Path, tmp_path: Path) -> None:
    served = load_reward_model(attributed, dtype="float32", device="cpu")
    exported = load_reward_model(export_seq_cls(attributed, tmp_path / "out"), dtype="float32", device="cpu")
    inputs = [ScoringInput(i["prompt"], i["response"]) for i in ITEMS]
    assert exported.readout.labels == ("LABEL_0",)
    assert direct(exported, inputs) == pytest.approx(direct(served, inputs), abs=1e-5)
