"""/rank (GRPO/RLOO groups), /get_reward (OpenRLHF) and static normalization, over HTTP."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx
import pytest

PROMPT = "Human: What is the capital of France?\n\nAssistant:"
RESPONSES = ["Paris.", "I think it is Paris, the capital.", "Madrid.", "Paris."]


async def scores(client: httpx.AsyncClient, prompt: str, responses: list[str]) -> list[float]:
    r = await client.post("/score", json={"items": [{"prompt": prompt, "response": x} for x in responses]})
    return r.json()["rewards"]


async def test_rank_group_statistics(make_client: Any) -> None:
    async with make_client("llama") as client:
        r = await client.post(
            "/rank",
            json={
                "groups": [{"prompt": PROMPT, "responses": RESPONSES}, {"prompt": "hi", "responses": ["hello"]}],
                "probabilities": True,
            },
        )
        want = await scores(client, PROMPT, RESPONSES)
    assert r.status_code == 200, r.text
    group, single = r.json()["groups"]
    assert group["rewards"] == pytest.approx(want, abs=1e-5)
    n = len(want)
    mean = sum(want) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in want) / (n - 1))
    assert group["mean"] == pytest.approx(mean, abs=1e-6) and group["std"] == pytest.approx(std, abs=1e-6)
    assert group["advantages"] == pytest.approx([(x - mean) / (std + 1e-4) for x in want], abs=1e-5)
    assert group["loo_baselines"] == pytest.approx([(sum(want) - x) / (n - 1) for x in want], abs=1e-6)
    order = sorted(range(n), key=lambda i: -want[i])
    assert group["ranks"][order[0]] == 1
    assert group["ranks"][0] == group["ranks"][3]  # identical responses tie
    p = group["probabilities"]
    assert p[0][2] == pytest.approx(1 / (1 + math.exp(want[2] - want[0])), abs=1e-6)
    assert p[1][1] == pytest.approx(0.5)
    assert single["std"] == 0.0 and single["loo_baselines"] == [None] and single["ranks"] == [1]
    assert single["probabilities"] == [[0.5]]


async def test_rank_validation(make_client: Any) -> None:
    async with make_client("llama") as client:
        empty = await client.post("/rank", json={"groups": [{"prompt": "a", "responses": []}]})
        typed = await client.post("/rank", json={"groups": [{"prompt": "a", "responses": ["x", 2]}]})
    assert empty.status_code == 422 and empty.json()["error"]["param"] == "groups[0].responses"
    assert typed.status_code == 422 and typed.json()["error"]["param"] == "groups[0].responses[1]"


async def test_get_reward_splits_the_prompt_off_the_query(make_client: Any) -> None:
    async with make_client("value_head") as client:
        queries = [PROMPT + " " + x + "<|im_end|>" for x in RESPONSES[:2]]
        r = await client.post("/get_reward", json={"query": queries, "prompts": [PROMPT] * 2, "labels": ["a", "b"]})
        want = await scores(client, PROMPT, [" " + x for x in RESPONSES[:2]])
        empty = await client.post("/get_reward", json={"query": []})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rewards"] == pytest.approx(want, abs=1e-5) and body["scores"] == body["rewards"]
    readings = client.app.state.registry.resolve(None).reader.readings
    logs = {
        "reward_num_tokens",
        "reward_truncated",
        "reward_monitor_warnings",
        *(f"reward_read_as_{r}" for r in readings),
    }
    assert set(body["extra_logs"]) == logs and body["read_as"] == ["text", "text"]
    assert body["extra_logs"]["reward_read_as_text"] == [1.0, 1.0] and body["extra_logs"]["reward_read_as_raw"] == [
        0,
        0,
    ]
    assert empty.status_code == 200 and empty.json() == {
        "rewards": [],
        "scores": [],
        "extra_logs": {key: [] for key in logs},
        "read_as": [],
        "normalization": None,
        "step_rewards": None,  # a process reward model's
        "model": body["model"],
        "fingerprint": body["fingerprint"],
    }


async def test_get_reward_scores_a_templated_query_as_is(make_client: Any, load: Any) -> None:
    """A query already in the chat template (OpenRLHF with --apply_chat_template) is not templated twice."""
    from app.model.recipe import ScoringInput

    model = load("value_head")
    templated = model.encoder.render(ScoringInput(PROMPT, "Paris."))
    async with make_client("value_head") as client:
        r = await client.post("/get_reward", json={"query": [templated]})
        prompted = await client.post("/get_reward", json={"query": [templated], "prompts": [templated[:40]]})
        want = await scores(client, PROMPT, ["Paris."])
    assert r.json()["rewards"] == pytest.approx(want, abs=1e-5)
    assert prompted.json()["rewards"] == pytest.approx(want, abs=1e-5)


async def test_get_reward_bad_input(make_client: Any) -> None:
    async with make_client("llama") as client:
        misaligned = await client.post("/get_reward", json={"query": ["a", "b"], "prompts": ["a"]})
        typed = await client.post("/get_reward", json={"query": [1]})
    assert misaligned.status_code == 422 and "prompts has 1 entries" in misaligned.json()["error"]["message"]
    assert typed.status_code == 422 and typed.json()["error"]["param"] == "query[0]"


async def test_single_item_get_reward_calls_are_batched(make_client: Any) -> None:
    async with make_client("llama") as client:
        worker = client.app.state.workers[0]
        before = worker.stats.batches
        replies = await asyncio.gather(
            *(client.post("/get_reward", json={"query": [f"q{i} answer {i}"], "prompts": [f"q{i}"]}) for i in range(32))
        )
        assert all(r.status_code == 200 for r in replies)
        assert worker.stats.batches - before < 32


async def test_normalization_applies_to_score_rank_get_reward_not_compare(make_client: Any) -> None:
    async with make_client("openrlhf") as raw_client:
        raw = await scores(raw_client, PROMPT, RESPONSES[:2])
    async with make_client("openrlhf", normalize=True) as client:  # mean 0.5, std 2.0 from config.json
        score = (
            await client.post("/score", json={"items": [{"prompt": PROMPT, "response": x} for x in RESPONSES[:2]]})
        ).json()
        rank = (await client.post("/rank", json={"groups": [{"prompt": PROMPT, "responses": RESPONSES[:2]}]})).json()
        get = (await client.post("/get_reward", json={"query": [PROMPT + RESPONSES[0]], "prompts": [PROMPT]})).json()
        cmp = (
            await client.post(
                "/compare", json={"pairs": [{"prompt": PROMPT, "response_a": RESPONSES[0], "response_b": RESPONSES[1]}]}
            )
        ).json()
    normalized = [(x - 0.5) / 2.0 for x in raw]
    assert score["rewards"] == pytest.approx(normalized, abs=1e-5)
    assert score["normalization"] == {"mean": 0.5, "std": 2.0}
    assert rank["groups"][0]["rewards"] == pytest.approx(normalized, abs=1e-5) and rank["normalization"]
    assert get["rewards"] == pytest.approx(normalized[:1], abs=1e-5)
    assert cmp["pairs"][0]["a"]["reward"] == pytest.approx(raw[0], abs=1e-5)
    async with make_client("openrlhf", normalize=True, reward_mean=1.0, reward_std=4.0) as client:
        over = (await client.post("/score", json={"items": [{"prompt": PROMPT, "response": RESPONSES[0]}]})).json()
    assert over["rewards"][0] == pytest.approx((raw[0] - 1.0) / 4.0, abs=1e-5)


async def test_every_route_reports_the_normalization_in_force(make_client: Any) -> None:
    """One normalization, decided at start-up: /info showed the checkpoint's stored statistics (even when off, or
    overridden), and /get_reward stated none."""
    query = {"query": [PROMPT + RESPONSES[0]], "prompts": [PROMPT]}
    async with make_client("openrlhf") as client:
        off_info = (await client.get("/info")).json()
        off_get = (await client.post("/get_reward", json=query)).json()
    async with make_client("openrlhf", normalize=True, reward_mean=1.0) as client:  # std 2.0 from the checkpoint
        info = (await client.get("/info")).json()
        get = (await client.post("/get_reward", json=query)).json()
        score = (await client.post("/score", json={"items": [{"prompt": PROMPT, "response": RESPONSES[0]}]})).json()
        rank = (await client.post("/rank", json={"groups": [{"prompt": PROMPT, "responses": RESPONSES[:1]}]})).json()
    stored = {"mean": 0.5, "std": 2.0}
    assert off_info["normalization"] is None and off_info["checkpoint_normalization"] == stored
    assert off_get["normalization"] is None
    in_force = {"mean": 1.0, "std": 2.0}
    assert info["normalization"] == get["normalization"] == score["normalization"] == rank["normalization"] == in_force
    assert info["checkpoint_normalization"] == stored
    assert get["rewards"][0] == pytest.approx((off_get["rewards"][0] - 1.0) / 2.0, abs=1e-5)
    assert get["rewards"] == pytest.approx(score["rewards"], abs=1e-5)


async def test_normalization_without_statistics_refuses_to_start(make_client: Any) -> None:
    with pytest.raises(ValueError, match="neither the settings"):
        async with make_client("llama", normalize=True):
            pass


async def test_empty_text_is_422_not_a_model_error(make_client: Any) -> None:
    """Found by schemathesis: an empty raw query has no tokens at all with a template-only chat recipe."""
    async with make_client("llama") as client:
        r = await client.post("/get_reward", json={"query": ["fine", ""]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "query[1]"  # the body's own field
