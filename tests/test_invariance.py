"""An item's reward must not depend on its batch, its padding, or the padding side (float32: <= 1e-5 absolute)."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from app.model.collate import last_real_index
from app.model.loading import load_reward_model
from app.model.recipe import ScoringInput
from app.model.reward_model import RewardModel

TOL = 1e-5
rng = random.Random(0)
WORDS = [
    *["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "near"],
    *["the", "river", "bank", "hello", "world", "sea", "wind", "stars"],
]


def sentence(n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


ITEMS = [ScoringInput(sentence(p), sentence(r)) for p, r in [(1, 1), (3, 2), (40, 5), (5, 60), (120, 30), (2, 9)]]
MODELS = ["llama", "gpt2", "bert", "value_head", "peft", "openrlhf"]


@pytest.mark.parametrize("name", MODELS)
def test_alone_equals_any_mixed_batch(name: str, load: Callable[..., RewardModel]) -> None:
    model = load(name)
    encoded = model.encoder.encode_batch(ITEMS)
    lengths = [len(e) for e in encoded]
    assert max(lengths) > 10 * min(lengths)  # very different lengths in one batch
    alone = [model.score([e])[0] for e in encoded]
    assert max(abs(a) for a in alone) > 0.05  # rewards of a size where 1e-5 means something
    for multiple in (1, 8, 64):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        mixed = model.score([encoded[i] for i in order], pad_to_multiple_of=multiple)
        for i, got in zip(order, mixed, strict=True):
            assert abs(got - alone[i]) <= TOL, (name, multiple, i, got, alone[i])
    # the same item repeated in a batch of others: identical copies
    repeated = model.score([encoded[0], encoded[4], encoded[0], encoded[3]], pad_to_multiple_of=16)
    assert abs(repeated[0] - alone[0]) <= TOL and abs(repeated[2] - alone[0]) <= TOL


@pytest.mark.parametrize("name", ["llama", "gpt2", "value_head"])
def test_left_padding_reads_the_same_token(name: str, load: Callable[..., RewardModel]) -> None:
    """Callers that pad on the left (HF decoders often do) get the same rewards: positions come from the mask."""
    model = load(name)
    encoded = model.encoder.encode_batch(ITEMS)
    right = model.score(encoded, pad_to_multiple_of=16)
    width = max(len(e) for e in encoded) + 3
    ids = torch.full((len(encoded), width), model.pad_id)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, width - len(e) :] = torch.tensor(e.input_ids)
        mask[row, width - len(e) :] = 1
    assert (last_real_index(mask) == width - 1).all()
    with torch.inference_mode():
        left = model.module(ids, mask).tolist()
    for a, b in zip(left, right, strict=True):
        assert abs(a - b) <= TOL


def test_tokenizer_padding_side_does_not_matter(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    copy = shutil.copytree(checkpoints["llama"], tmp_path / "left")
    config_file = copy / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["padding_side"] = "left"
    config_file.write_text(json.dumps(config))
    left = load_reward_model(copy, dtype="float32", device="cpu")
    right = load_reward_model(checkpoints["llama"], dtype="float32", device="cpu")
    assert left.encoder.tokenizer.padding_side == "left"
    a = left.score(left.encoder.encode_batch(ITEMS), 16)
    b = right.score(right.encoder.encode_batch(ITEMS), 16)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= TOL


def test_pad_equal_to_eos_still_reads_the_eos(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """HF's own pooling skips a trailing EOS when pad == eos (transformers #35352); ours reads it."""
    copy = shutil.copytree(checkpoints["value_head"], tmp_path / "pad_eos")
    config_file = copy / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["pad_token"] = config["eos_token"]
    config_file.write_text(json.dumps(config))
    model = load_reward_model(copy, dtype="float32", device="cpu")
    assert model.pad_id == model.encoder.eos_id
    encoded = model.encoder.encode_batch(ITEMS)
    assert all(e.input_ids[-1] == model.encoder.eos_id for e in encoded)
    alone = [model.score([e])[0] for e in encoded]
    mixed = model.score(encoded, 16)
    assert max(abs(x - y) for x, y in zip(alone, mixed, strict=True)) <= TOL
