"""`reward-server export`: the merged seq-cls directory scores the same in our server and in plain transformers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from app.cli import main
from app.model.loading import load_reward_model
from app.model.recipe import ScoringInput
from app.model.reward_model import RewardModel

ITEMS = [ScoringInput("What is the capital of France?", "Paris."), ScoringInput("hi", "hello there, friend")]


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
    assert ours.score(encoded) == pytest.approx(want, abs=1e-5)
    # plain transformers, padded batch with the exported tokenizer's pad token (distinct from EOS)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
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
        got = hf(input_ids=ids, attention_mask=mask, **kwargs).logits[:, 0].tolist()
    assert got == pytest.approx(want, abs=1e-5)


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
        assert card == pytest.approx(served.score(served.encoder.encode_batch([item]))[0], abs=1e-5)
    assert tokenizer.truncation_side == "left"
    again = load_reward_model(out, dtype="float32", device="cpu")  # and our own reading of the export is unchanged
    assert again.encoder.encode(ITEMS[0]).input_ids == served.encoder.encode(ITEMS[0]).input_ids
