"""`reward-server export`: the merged seq-cls directory scores the same in our server and in plain transformers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from app.cli import main
from app.model.loading import load_reward_model
from app.model.recipe import Encoded, ScoringInput
from app.model.reward_model import RewardModel
from tests import tiny

ITEMS = [ScoringInput("What is the capital of France?", "Paris."), ScoringInput("hi", "hello there, friend")]


def parity(got: list[float], want: list[float]) -> bool:
    """What the README promises for plain transformers: within 1e-5 x max(1, |reward|). It sums in another order
    than our kernels, so the float32 difference grows with the reward's size (measured 2e-7 to 7e-7 x |reward| on
    tiny models, 1.5e-6 on models/default; transformers' own lone and padded-batch forwards differ as much): an
    absolute 1e-5 fails from rewards of about 20."""
    return got == pytest.approx(want, rel=1e-5, abs=1e-5)


def hf_padded(out: Path, encoded: list[Encoded]) -> list[float]:
    """Rewards from plain transformers: one right-padded batch with the exported tokenizer's pad token."""
    hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        mask[row, : len(e)] = 1
    kwargs = {}
    if encoded[0].token_type_ids is not None:
        types = torch.zeros_like(ids)
        for row, e in enumerate(encoded):
            types[row, : len(e)] = torch.tensor(e.token_type_ids)
        kwargs["token_type_ids"] = types
    with torch.no_grad():
        return [float(x) for x in hf(input_ids=ids, attention_mask=mask, **kwargs).logits[:, 0]]


@pytest.mark.parametrize("name", ["value_head", "peft", "openrlhf", "bert"])
def test_export_is_exact(
    name: str, checkpoints: dict[str, Path], load: Callable[..., RewardModel], tmp_path: Path
) -> None:
    source = load(name)
    if name == "value_head":  # our own training writes bias-free heads; this fixture's head has a bias
        with pytest.raises(SystemExit, match="bias"):
            main(["export", "--model", str(checkpoints[name]), "--out", str(tmp_path / "x")])
        return
    out = tmp_path / "exported"
    assert main(["export", "--model", str(checkpoints[name]), "--out", str(out)]) == 0
    want = source.score(source.encoder.encode_batch(ITEMS))
    ours = load_reward_model(out, dtype="float32", device="cpu")
    assert ours.info.format == "seq_cls" and ours.info.recipe == source.info.recipe
    encoded = ours.encoder.encode_batch(ITEMS)
    assert ours.score(encoded) == want  # this server reads the export bit for bit as it read the source
    assert parity(hf_padded(out, encoded), want)


def test_export_parity_is_relative_to_the_rewards_size(tmp_path: Path) -> None:
    """A tiny Llama whose head is 100x the fixtures' (rewards 10 to 64, as an unnormalized trained head gives): the
    export still matches this server bit for bit, and transformers within 1e-5 x |reward| (measured 3.8e-5 at 64: an
    absolute 1e-5, the README's old promise, fails here as it did on the issue's model)."""
    source = tiny.build_llama_seq_cls(tmp_path / "source")
    weights = tmp_path / "source" / "model.safetensors"
    state = load_file(weights)
    state["score.weight"] = state["score.weight"] * 100
    save_file(state, weights, metadata={"format": "pt"})
    served = load_reward_model(source, dtype="float32", device="cpu")
    items = [*ITEMS, ScoringInput("Write a short poem about the sea.", "The wind and the stars at night. " * 8)]
    encoded = served.encoder.encode_batch(items)
    want = served.score(encoded)
    assert min(abs(r) for r in want) > 5  # the scale this test is about
    out = tmp_path / "exported"
    assert main(["export", "--model", str(source), "--out", str(out)]) == 0
    ours = load_reward_model(out, dtype="float32", device="cpu")
    assert ours.score(ours.encoder.encode_batch(items)) == want
    got = hf_padded(out, encoded)
    assert parity(got, want)
    assert not parity([x + 2e-5 * abs(x) for x in got], want)  # the bound is relative, not loose


def test_an_export_reads_the_same_the_way_a_model_card_reads_it(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """A recipe with a system prompt and a closing EOS: the exported template encodes both, so rendering and
    tokenizing a conversation with the exported tokenizer alone gives the served sequence and reward."""
    source = tmp_path / "source"
    shutil.copytree(checkpoints["llama"], source)
    recipe = {"template": "chat", "max_length": 256, "append_eos": True, "system_prompt": "Be brief."}
    (source / "reward_manifest.json").write_text(json.dumps({"format": "seq_cls", "recipe": recipe}))
    served = load_reward_model(source, dtype="float32", device="cpu")
    out = tmp_path / "exported"
    assert main(["export", "--model", str(source), "--out", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    for item in ITEMS:
        conversation = [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": item.response}]
        ids = tokenizer.apply_chat_template(conversation, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assert ids == served.encoder.encode(item).input_ids
        with torch.no_grad():
            card = float(hf(input_ids=torch.tensor([ids])).logits[0][0])
        assert parity([card], served.score(served.encoder.encode_batch([item])))
    assert tokenizer.truncation_side == "left"
    again = load_reward_model(out, dtype="float32", device="cpu")  # and our own reading of the export is unchanged
    assert again.encoder.encode(ITEMS[0]).input_ids == served.encoder.encode(ITEMS[0]).input_ids
