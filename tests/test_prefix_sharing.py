"""Shared-prompt reuse: a prompt several items share runs once; every reward equals its item's plain forward pass."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.engine.offline import OFFLINE, score_offline
from app.model.collate import Batch, SharedBatch, collate_shared
from app.model.recipe import Formatted, ScoringInput
from app.model.reward_model import RewardModel
from app.server.main import create_app
from tests.conftest import test_settings
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
    batch = model.plan(encoded, 16, share=True)
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
    items = [Formatted("the quick " + sentence(n), prompt="the qui") for n in (3, 9)]
    encoded = model.encoder.encode_batch(items)
    assert [tokens(e.input_ids[: e.prefix]) for e in encoded] == [["t", "he", "Ġqu"]] * 2  # not "i", not "ick"
    want = alone(model, items)
    assert max(abs(a - b) for a, b in zip(model.score(encoded, share=True), want, strict=True)) <= TOL


def test_truncated_items_share_only_what_survives(load: Callable[..., RewardModel]) -> None:
    model = load("llama", max_length=48)
    long_prompt = sentence(200)
    short, long = model.encoder.encode_batch([ScoringInput(long_prompt, "yes"), ScoringInput(long_prompt, sentence(6))])
    assert short.truncated and long.truncated
    assert 0 < long.prefix < short.prefix < 48
    got = model.score([short, long], 16, share=True)
    want = [model.score([e], share=False)[0] for e in (short, long)]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOL


def test_raw_queries_share_a_templated_prompt_they_start_with(load: Callable[..., RewardModel]) -> None:
    model = load("llama")
    prompt = "<|im_start|>user\nWhere is Paris?<|im_end|>\n<|im_start|>assistant\n"
    raw = [Formatted(prompt + reply, prompt=prompt) for reply in ("In France.", "No idea, sorry.")]
    encoded = model.encoder.encode_batch(raw)
    assert all(e.prefix > 0 for e in encoded)
    assert collate_shared(encoded, model.pad_id) is not None
    assert model.encoder.encode(Formatted(prompt + "x")).prefix == 0  # no prompt given
    want = alone(model, raw)
    assert max(abs(a - b) for a, b in zip(model.score(encoded, share=True), want, strict=True)) <= TOL


def test_encoders_never_share(load: Callable[..., RewardModel]) -> None:
    """Bidirectional attention: a prompt's states depend on the reply, nothing can be reused."""
    model = load("bert")
    assert not model.can_share_prefixes
    assert_never_shares(model)


def test_a_model_whose_cached_path_differs_is_caught_at_the_check(load: Callable[..., RewardModel]) -> None:
    model = load("llama", max_length=512)  # a distinct cached instance: the check below runs fresh
    real = model.module.forward_shared
    model.module.forward_shared = lambda batch: real(batch) + 0.5  # type: ignore[method-assign]
    try:
        assert not model.can_share_prefixes
    finally:
        model.module.forward_shared = real  # type: ignore[method-assign]
    assert_never_shares(model)


def assert_never_shares(model: RewardModel) -> None:
    """The batch policy fitted to the model shares nothing, and asking the model to share anyway is refused."""
    assert not OFFLINE.for_model(model).share_prefixes
    with pytest.raises(ValueError, match="cannot share prompts"):
        model.plan(model.encoder.encode_batch(GROUPS[:4]), 16, share=True)


def test_offline_scoring_shares_and_matches(load: Callable[..., RewardModel]) -> None:
    model = load("value_head")
    inputs = [*GROUPS, *LONE]
    want = alone(model, inputs)
    got = score_offline(model, inputs)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOL


async def test_a_model_that_cannot_share_is_batched_on_the_plain_cost(
    load: Callable[..., RewardModel], checkpoints: dict[str, Path]
) -> None:
    """The batch policy follows what the loaded model can do, not only the setting: a model whose sharing check
    failed used to be batched on the shared cost model and run plain, far over `max_batch_tokens`."""
    served = copy.copy(load("llama", max_length=128))
    served.can_share_prefixes = False  # as when the check at start-up finds that the cached path differs
    padded: list[int] = []
    real_run = served.run

    def recording(batch: Batch | SharedBatch) -> list[float]:
        padded.append(batch.padded_tokens)
        return real_run(batch)

    served.run = recording  # type: ignore[method-assign]
    prompt = "Explain, step by step and with care, how the tides of the ocean follow the moon. " * 2
    inputs = [ScoringInput(prompt, f"Reply {i}.") for i in range(8)]  # 123 tokens each, 114 of them the prompt
    # shared, all 8 cost 128 + 8 x 16 = 256 padded tokens; plain, 8 x 128 = 1024
    settings = test_settings(
        checkpoints["llama"], max_batch_tokens=256, min_padding_efficiency=0.0, batch_invariant=False
    )
    app = create_app(settings, model=served)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            info = (await client.get("/info")).json()
            items = [{"prompt": x.prompt, "response": x.response} for x in inputs]
            r = await client.post("/score", json={"items": items})
    assert r.status_code == 200 and not info["shares_prefixes"]
    assert max(padded) <= 256 and sum(padded[1:]) >= 1024  # every batch within budget; the warm-up came first
    assert r.json()["rewards"] == pytest.approx(alone(served, inputs), abs=TOL)
