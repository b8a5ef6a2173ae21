"""vLLM's pooling API on our batcher: every request form gives the reward /score gives for the same sequence."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from app.model.recipe import ScoringInput

PROMPT, REPLIES = "What is the capital of France?", ["Paris.", "I think it is Lyon, but I am not sure at all."]
RAW = {"use_activation": False}


async def rewards(client: httpx.AsyncClient, replies: list[str] = REPLIES) -> list[float]:
    r = await client.post("/score", json={"items": [{"prompt": PROMPT, "response": x} for x in replies]})
    return list(r.json()["rewards"])


async def classify(client: httpx.AsyncClient, body: dict[str, Any], route: str = "/classify") -> list[float]:
    r = await client.post(route, json=body)
    assert r.status_code == 200, r.text
    return [d["probs"][0] for d in r.json()["data"]]


async def test_every_input_form_equals_score_on_the_same_sequence(make_client: Any, load: Any) -> None:
    model = load("value_head")  # chat recipe, appends EOS: text is finished by the recipe, ids are exact
    items = [ScoringInput(PROMPT, x) for x in REPLIES]
    texts = [str(model.encoder.render(i)) for i in items]
    ids = [e.input_ids for e in model.encoder.encode_batch(items)]
    bos = model.encoder.tokenizer.bos_token
    async with make_client("value_head") as client:
        want = await rewards(client)
        assert await classify(client, {"input": texts[0], **RAW}) == pytest.approx(want[:1], abs=1e-5)
        assert await classify(client, {"input": texts, **RAW}) == pytest.approx(want, abs=1e-5)
        assert await classify(client, {"input": ids[1], **RAW}) == pytest.approx(want[1:], abs=1e-5)
        assert await classify(client, {"input": ids, **RAW}) == pytest.approx(want, abs=1e-5)
        verl_text = [t.removeprefix(bos) + "\n" for t in texts]  # verl: BOS stripped, the template's newline kept
        assert await classify(client, {"input": verl_text, **RAW}) == pytest.approx(want, abs=1e-5)
        chat = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": REPLIES[1]}]
        assert await classify(client, {"messages": chat, **RAW}) == pytest.approx(want[1:], abs=1e-5)
        parts = [chat[0], {"role": "assistant", "content": [{"type": "text", "text": REPLIES[1]}]}]
        assert await classify(client, {"messages": parts, **RAW}) == pytest.approx(want[1:], abs=1e-5)
        bare = await classify(client, {"input": texts[0].removeprefix(bos), "add_special_tokens": False, **RAW})
    assert bare[0] != pytest.approx(want[0], abs=1e-4)  # without its BOS the sequence is another one


async def test_activation_and_its_aliases(make_client: Any) -> None:
    async with make_client("llama") as client:
        raw = await classify(client, {"input": ["a reply", "another"], **RAW})
        default = await classify(client, {"input": ["a reply", "another"]})
        assert default == pytest.approx([1 / (1 + math.exp(-r)) for r in raw], abs=1e-9)
        for alias in ({"activation": False}, {"softmax": False}, {"use_activation": False, "activation": True}):
            assert await classify(client, {"input": ["a reply", "another"], **alias}) == pytest.approx(raw, abs=1e-9)
        assert await classify(client, {"input": ["a reply", "another"], "use_activation": True}) == default


async def test_response_shape_aliases_and_unknown_fields(make_client: Any) -> None:
    async with make_client("llama", served_model_name="my-rm") as client:
        body = {"model": "anything", "input": ["one", "two"], "priority": 3, "user": "u", "dimensions": None}
        r = await client.post("/v1/classify", json=body)
        pooled = await client.post("/pooling", json={**body, "task": "classify"})
        listed = await client.get("/v1/models")
        embed = await client.post("/pooling", json={"input": "x", "task": "embed"})
    out = r.json()
    assert r.status_code == 200 and out["object"] == "list" and out["model"] == "my-rm"
    assert out["id"].startswith("classify-") and isinstance(out["created"], int)
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert all(d["num_classes"] == 1 and len(d["probs"]) == 1 and d["label"] for d in out["data"])
    assert out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] > 0 and out["usage"]["completion_tokens"] == 0
    assert [d["data"] for d in pooled.json()["data"]] == [d["probs"] for d in out["data"]]
    assert pooled.json()["data"][0]["object"] == "pooling"
    card = listed.json()["data"][0]
    assert listed.json()["object"] == "list" and card["id"] == "my-rm" and card["object"] == "model"
    assert card["max_model_len"] == 512 and card["root"].endswith("llama")
    assert embed.status_code == 422 and "classify" in embed.json()["error"]["message"]


async def test_truncation_as_vllm_does_it(make_client: Any, load: Any) -> None:
    model = load("llama")
    ids = model.encoder.encode(ScoringInput(PROMPT, REPLIES[1])).input_ids
    exact = [_exact_score(model, x) for x in (ids[-6:], ids[:6])]
    words = "one two three four five six"
    tokens = model.encoder.tokenizer(words)["input_ids"]  # the tokenizer's BOS first, kept through truncation
    async with make_client("llama") as client:
        left = await classify(client, {"input": ids, "truncate_prompt_tokens": 6, **RAW})
        right = await classify(client, {"input": ids, "truncate_prompt_tokens": 6, "truncation_side": "right", **RAW})
        whole = await classify(client, {"input": ids, "truncate_prompt_tokens": -1, **RAW})
        long = ids * 40  # over max_length (512)
        refused = await client.post("/classify", json={"input": [ids, long]})
        kept = await classify(client, {"input": long, "truncate_prompt_tokens": -1, **RAW})
        too_many = await client.post("/classify", json={"input": "x", "truncate_prompt_tokens": 513})
        text = await classify(client, {"input": words, "truncate_prompt_tokens": 3, **RAW})
        outside = await client.post("/classify", json={"input": [[1, 2], [10**6]]})
    assert left == pytest.approx(exact[:1], abs=1e-5) and right == pytest.approx(exact[1:], abs=1e-5)
    assert whole == pytest.approx([model.score([model.encoder.encode(ScoringInput(PROMPT, REPLIES[1]))])[0]], abs=1e-5)
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "input[1]"
    assert "truncate_prompt_tokens" in refused.json()["error"]["message"]
    assert kept == pytest.approx([_exact_score(model, long[-512:])], abs=1e-5)
    assert too_many.status_code == 422 and "1..512" in too_many.json()["error"]["message"]
    assert tokens[0] == model.encoder.bos_id and text == pytest.approx(
        [_exact_score(model, tokens[:1] + tokens[-2:])], abs=1e-5
    )
    assert outside.status_code == 422 and outside.json()["error"]["param"] == "input[1]"


async def test_bad_requests_are_typed_422s(make_client: Any) -> None:
    async with make_client("llama") as client:
        cases = {
            "neither": {"model": "m"},
            "both": {"input": "x", "messages": [{"role": "assistant", "content": "y"}]},
            "empty": {"input": []},
            "no reply": {"messages": [{"role": "user", "content": "hi"}]},
            "mixed": {"input": ["a", 1]},
            "bools": {"input": [True, False]},
            "second bos": {"messages": [{"role": "assistant", "content": "y"}], "add_special_tokens": True},
            "negative": {"input": "x", "truncate_prompt_tokens": -2},
        }
        for name, body in cases.items():
            r = await client.post("/classify", json=body)
            assert r.status_code == 422 and r.json()["error"]["type"] == "validation_error", name


async def test_normalization_in_force_applies(make_client: Any) -> None:
    """The reward a route serves is decided once: /classify reads the same normalized reward /score returns."""
    async with make_client("openrlhf", normalize=True) as client:
        want = await rewards(client)
        chat = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": REPLIES[0]}]
        r = await client.post("/classify", json={"messages": chat, **RAW})
    assert r.json()["data"][0]["probs"] == pytest.approx(want[:1], abs=1e-5)


def _exact_score(model: Any, ids: list[int]) -> float:
    from app.model.recipe import Formatted

    return float(model.score([model.encoder.encode(Formatted(ids=tuple(ids), keep=-1))])[0])
