"""Shared-prompt reuse: a prompt several items share runs once; every reward equals its item's plain forward pass."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from app.ml.collate import SharedBatch, collate_shared
from app.ml.recipe import ScoringInput
from app.ml.reward_model import RewardModel
from tests.test_invariance import sentence

TOL = 1e-4  # float32; the cached path sums attention in another order

PROMPTS = [sentence(60), sentence(8), "Human: hi there\n\nAssistant: hello\n\nHuman: " + sentence(30)]
GROUPS = [ScoringInput(p, sentence(n)) for p in PROMPTS for n in (1, 4, 17, 40)]
LONE = [ScoringInput(sentence(25), sentence(6)), ScoringInput(sentence(3), sentence(50))]


def alone(model: RewardModel, inputs: list[ScoringInput]) -> list[float]:
    return [model.score([e], share=False)[0] for e in model.encoder.encode_batch(inputs)]


@pytest.mark.parametrize("name", ["llama", "gpt2", "value_head", "peft", "openrlhf"])
def test_shared_prompts_give_the_plain_rewards(name: str, load: Callable[..., RewardModel]) -> None:
    model = load(name)
    assert model.can_share_prefixes
    inputs = [*GROUPS, *LONE]
    encoded = model.encoder.encode_batch(inputs)
    batch = model.plan(encoded, 16)
    assert isinstance(batch, SharedBatch)
    assert len(batch.prefixes) == len(PROMPTS)  # each prompt runs once; the lone items ride with an empty prefix
    plain = model.plan(encoded, 16, share=False)
    saved = sum(3 * e.prefix for e in encoded[0 : len(GROUPS) : 4])  # groups of 4: three copies of each prompt
    assert plain.real_tokens - batch.real_tokens == saved > plain.real_tokens / 3
    want = alone(model, inputs)
    got = model.run(batch)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOL


def test_a_token_merging_prompt_and_reply_is_not_shared(load: Callable[..., RewardModel]) -> None:
    """Tokenized alone, a prompt can end in a token the whole sequence does not have ("qu" "i" vs "qu" "ick"): only
    the tokens identical in the whole sequence count as shared, so such items still score exactly."""
    model = load("llama")
    tokens = model.encoder.tokenizer.convert_ids_to_tokens
    items = [ScoringInput("the qui", "the quick " + sentence(n), raw=True) for n in (3, 9)]
    encoded = model.encoder.encode_batch(items)
    assert [tokens(e.input_ids[: e.prefix]) for e in encoded] == [["t", "he", "Ġqu"]] * 2  # not "i", not "ick"
    want = alone(model, items)
    assert max(abs(a - b) for a, b in zip(model.score(encoded), want, strict=True)) <= TOL


def test_truncated_items_share_only_what_survives(load: Callable[..., RewardModel]) -> None:
    model = load("llama", max_length=48)
    long_prompt = sentence(200)
    short, long = model.encoder.encode_batch([ScoringInput(long_prompt, "yes"), ScoringInput(long_prompt, sentence(6))])
    assert short.truncated and long.truncated
    assert 0 < long.prefix < short.prefix < 48
    got = model.score([short, long], 16)
    want = [model.score([e], share=False)[0] for e in (short, long)]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOL


def test_raw_queries_share_a_templated_prompt_they_start_with(load: Callable[..., RewardModel]) -> None:
    model = load("llama")
    prompt = "<|im_start|>user\nWhere is Paris?<|im_end|>\n<|im_start|>assistant\n"
    raw = [ScoringInput(prompt, prompt + reply, raw=True) for reply in ("In France.", "No idea, sorry.")]
    encoded = model.encoder.encode_batch(raw)
    assert all(e.prefix > 0 for e in encoded)
    assert collate_shared(encoded, model.pad_id) is not None
    assert model.encoder.encode(ScoringInput("", prompt + "x", raw=True)).prefix == 0  # no prompt given
    want = alone(model, raw)
    assert max(abs(a - b) for a, b in zip(model.score(encoded), want, strict=True)) <= TOL


def test_encoders_never_share(load: Callable[..., RewardModel]) -> None:
    """Bidirectional attention: a prompt's states depend on the reply, nothing can be reused."""
    model = load("bert")
    assert not model.can_share_prefixes
    encoded = model.encoder.encode_batch(GROUPS[:4])
    assert not isinstance(model.plan(encoded, 16), SharedBatch)


def test_a_model_whose_cached_path_differs_is_caught_at_the_check(load: Callable[..., RewardModel]) -> None:
    model = load("llama", max_length=512)  # a distinct cached instance: the check below runs fresh
    real = model.module.forward_shared
    model.module.forward_shared = lambda batch: real(batch) + 0.5  # type: ignore[method-assign]
    try:
        assert not model.can_share_prefixes
    finally:
        model.module.forward_shared = real  # type: ignore[method-assign]
    encoded = model.encoder.encode_batch(GROUPS[:4])
    assert not isinstance(model.plan(encoded, 16), SharedBatch)


def test_offline_scoring_shares_and_matches(load: Callable[..., RewardModel]) -> None:
    model = load("value_head")
    inputs = [*GROUPS, *LONE]
    want = alone(model, inputs)
    got = model.score_inputs(inputs)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOL
