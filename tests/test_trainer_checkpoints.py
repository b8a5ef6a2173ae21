"""Trainer checkpoints are scored as their own training code built the sequences (#19 part 4).

OpenRLHF 0.11.2 (`openrlhf/datasets/reward_dataset.py`, read from the wheel): the chat template renders the prompt with
the generation prompt and the conversation, the reply is the conversation's text after the prompt's, trailing
newlines are stripped, `" " + eos_token` is added unless the text already ends with EOS, it is tokenized with
`add_special_tokens=False`, truncated on the right, and its last token forced to EOS; the value head reads that
token (`openrlhf/models/model.py`, `eos_indices`). The reference below follows those lines with plain transformers.

TRL 1.16's RewardTrainer tokenizes a conversation with `apply_chat_template(messages, tokenize=True)`
(`trl/data_utils.py::_tokenize`) and reads a sequence-classification model's logit: the card reading that
`tests/test_families.py` checks for every family replica.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer, LlamaForSequenceClassification

from app.model.loading import load_reward_model
from app.model.recipe import ScoringInput
from tests import tiny

PROMPT = [{"role": "user", "content": "What is the capital of France? Please answer in one short sentence."}]
REPLY = "The capital of France is Paris, the city on the river.\n"


def as_openrlhf(seq_cls: Path, out: Path) -> Path:
    """A family replica in OpenRLHF's saved layout: the base under `model.`, the head under `value_head_prefix`."""
    model = LlamaForSequenceClassification.from_pretrained(seq_cls, dtype=torch.float32)
    state = {f"model.{k}": v.contiguous() for k, v in model.model.state_dict().items()}
    state["value_head.weight"] = model.score.weight.detach().clone()
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"))
    config = model.config.to_dict()
    config.update(architectures=["LlamaForCausalLM"], value_head_prefix="value_head", normalize_reward=False)
    (out / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(seq_cls).save_pretrained(out)
    return out


def openrlhf_reading(path: Path, max_length: int) -> tuple[float, list[int]]:
    """OpenRLHF's RewardDataset.process_data, then its reward model's forward, for PROMPT + REPLY."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    chosen = tokenizer.apply_chat_template([*PROMPT, {"role": "assistant", "content": REPLY}], tokenize=False)
    chosen = (prompt + chosen[len(prompt) :]).rstrip("\n")
    if not chosen.endswith(tokenizer.eos_token):
        chosen += " " + tokenizer.eos_token
    ids = tokenizer(chosen, max_length=max_length, truncation=True, add_special_tokens=False)["input_ids"]
    ids[-1] = tokenizer.eos_token_id  # "to avoid EOS_token truncation"
    base = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    head = load_file(str(path / "model.safetensors"))["value_head.weight"]
    with torch.no_grad():
        hidden = base(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    return float(hidden @ head[0]), ids


@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
@pytest.mark.parametrize("max_length", [256, 20])
def test_openrlhf_checkpoints_read_as_openrlhf_trained_them(tmp_path: Path, family: str, max_length: int) -> None:
    path = as_openrlhf(tiny.build_family(tmp_path / "seq_cls", family), tmp_path / "openrlhf")
    want, want_ids = openrlhf_reading(path, max_length)
    model = load_reward_model(path, dtype="float32", device="cpu", max_length=max_length)
    encoded = model.encoder.encode(ScoringInput(PROMPT, REPLY))  # type: ignore[arg-type]
    assert encoded.input_ids == want_ids, family
    assert encoded.truncated == (max_length == 20)
    assert model.score([encoded])[0] == pytest.approx(want, abs=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if family == "gemma" and not encoded.truncated:  # its turn ends <end_of_turn>, not EOS: OpenRLHF adds " " + EOS
        assert tokenizer.decode(encoded.input_ids[-2:]) == " " + tokenizer.eos_token
