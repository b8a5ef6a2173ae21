"""Hub checkpoints (no manifest) are scored exactly as their model cards read them: the chat template rendered and
tokenized once (`apply_chat_template(conversation, tokenize=True)`), one BOS, no EOS the card does not add, the head
at the last token. Truncated to `max_length`, an item keeps its BOS and its last `max_length - 1` tokens."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from app.model.loading import load_reward_model
from app.model.recipe import ScoringInput
from app.server.main import create_app
from tests import tiny
from tests.conftest import test_settings

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France? Please answer in one short sentence."},
    {"role": "assistant", "content": "The capital of France is Paris, the city on the river."},
]


@pytest.fixture(scope="module", params=sorted(tiny.FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    name = str(request.param)
    return name, tiny.build_family(tmp_path_factory.mktemp(name) / name, name)


def card_reading(path: Path, max_length: int | None = None) -> tuple[float, list[int]]:
    """What a model card's code computes: render and tokenize with the template, one unpadded forward, logits[0][0]."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    if max_length is not None and len(ids) > max_length:
        bos = tokenizer.bos_token_id
        ids = ids[:1] + ids[-(max_length - 1) :] if bos is not None and ids[0] == bos else ids[-max_length:]
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0][0]), ids


@pytest.mark.parametrize("max_length", [None, 24])
def test_scored_as_the_card_reads_it(family: tuple[str, Path], max_length: int | None) -> None:
    name, path = family
    want, want_ids = card_reading(path, max_length)
    model = load_reward_model(path, dtype="float32", device="cpu", max_length=max_length)
    assert model.info.recipe["template"] == "chat" and not model.info.recipe["append_eos"]
    encoded = model.encoder.encode(ScoringInput(CONVERSATION[:1], CONVERSATION[1]["content"]))  # type: ignore[arg-type]
    assert encoded.input_ids == want_ids, name
    assert encoded.truncated == (max_length is not None)
    bos = model.encoder.bos_id
    assert sum(t == bos for t in encoded.input_ids) == (0 if name == "chatml" else 1)  # one BOS, truncated or not
    assert model.score([encoded])[0] == pytest.approx(want, abs=1e-5)


def test_a_bos_that_recurs_is_a_turn_marker_and_is_cut_like_text(tmp_path: Path) -> None:
    """SmolLM2 (the default model's base) names ChatML's `<|im_start|>` its bos_token: it opens every turn, so it is
    not a BOS to keep through truncation; the default model was trained with it cut like the rest of the text."""
    path = tiny.build_family(tmp_path / "smol", "chatml")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.bos_token = "<|im_start|>"
    tokenizer.save_pretrained(path)
    full = load_reward_model(path, dtype="float32", device="cpu").encoder.encode(
        ScoringInput(CONVERSATION[:1], CONVERSATION[1]["content"])  # type: ignore[arg-type]
    )
    short = load_reward_model(path, dtype="float32", device="cpu", max_length=24).encoder.encode(
        ScoringInput(CONVERSATION[:1], CONVERSATION[1]["content"])  # type: ignore[arg-type]
    )
    assert full.input_ids.count(tokenizer.bos_token_id) >= 2  # system, user, assistant turns
    assert short.truncated and short.input_ids == full.input_ids[-24:]


async def verl_classify(path: Path) -> float:
    """verl's reward loop: the conversation rendered with the reward model's template, a leading BOS stripped,
    `/classify {"model", "input": text, "use_activation": false}`, `data[-1].probs[-1]`."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False, tokenize=False)
    if tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token) :]
    app = create_app(test_settings(path), wait=True)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.post("/classify", json={"model": str(path), "input": text, "use_activation": False})
    assert r.status_code == 200, r.text
    return float(r.json()["data"][-1]["probs"][-1])


async def test_verls_discriminative_request_gets_the_card_reading(family: tuple[str, Path]) -> None:
    """The BOS verl strips comes back (add_special_tokens defaults to true): the sequence is the card's."""
    name, path = family
    assert await verl_classify(path) == pytest.approx(card_reading(path)[0], abs=1e-5), name


async def test_verl_gets_the_bos_back_where_only_the_template_writes_it(tmp_path: Path) -> None:
    """SmolLM2 (the default model's base): the template opens with its bos_token, the tokenizer adds none, so
    tokenizing verl's stripped text with special tokens would lose it (found on the default model: +0.13 vs -0.17)."""
    path = tiny.build_family(tmp_path / "smol", "chatml")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.bos_token = "<|im_start|>"
    tokenizer.save_pretrained(path)
    assert tokenizer("x")["input_ids"] == tokenizer("x", add_special_tokens=False)["input_ids"]  # adds no BOS
    assert await verl_classify(path) == pytest.approx(card_reading(path)[0], abs=1e-5)
