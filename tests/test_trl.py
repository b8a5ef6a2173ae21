"""TRL reward functions, called exactly as GRPOTrainer calls them: B prompts each repeated G times, keyword
arguments, extra dataset columns in **reward_kwargs. Results must equal a direct /score call."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import httpx
import pytest

from app.clients import AsyncRewardClient, AsyncRewardFunction, RewardClient, RewardFunction, RewardServerError
from app.clients.trl import to_items
from tests.conftest import free_port

G = 3  # num_generations
PROMPTS = ["What is the capital of France?", "Write a haiku about rain."]
COMPLETIONS = ["Paris.", "Lyon, I think.", "I do not know.", "Rain on the roof", "drip drop", "Clouds weep softly"]
CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about rain."}],
]


def grpo_batch(prompts: list[Any], completions: list[Any]) -> dict[str, Any]:
    """The keyword arguments GRPOTrainer passes: prompts repeated per generation, token ids, dataset columns."""
    repeated = [p for p in prompts for _ in range(G)]
    return {
        "prompts": repeated,
        "completions": list(completions),  # a copy: tests edit it
        "completion_ids": [[1, 2, 3]] * len(completions),
        "solution": [f"answer {i // G}" for i in range(len(completions))],  # an extra dataset column
        "trainer_state": object(),
    }


def standard_batch() -> dict[str, Any]:
    return grpo_batch(PROMPTS, COMPLETIONS)


def chat_batch() -> dict[str, Any]:
    return grpo_batch(CHATS, [[{"role": "assistant", "content": c}] for c in COMPLETIONS])


def direct_items(batch: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"prompt": p, "response": c}
        if isinstance(p, str)
        else {"messages": [{"role": m["role"], "content": m["content"]} for m in p + c]}
        for p, c in zip(batch["prompts"], batch["completions"], strict=True)
    ]


# --- TRL's view of the function ------------------------------------------------------------------------------


def test_name_and_how_trl_dispatches_on_it() -> None:
    sync = RewardFunction(base_url="http://fake")
    named = AsyncRewardFunction(base_url="http://fake", name="helpfulness")
    assert sync.__name__ == "reward_server" and named.__name__ == "helpfulness"
    # GRPOTrainer awaits a reward function only when it looks like a coroutine function.
    assert not inspect.iscoroutinefunction(sync) and not asyncio.iscoroutinefunction(sync)
    assert inspect.iscoroutinefunction(named) and asyncio.iscoroutinefunction(named)
    assert list(inspect.signature(named).parameters) == ["prompts", "completions", "completion_ids", "kwargs"]
    sync.close()


def test_items_for_both_trl_formats() -> None:
    assert to_items(["p"], ["c"]) == [{"prompt": "p", "response": "c"}]
    chat = to_items(
        [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "look"}]}]],
        [[{"role": "assistant", "content": "nice", "tool_calls": None}]],
    )
    assert chat == [{"messages": [{"role": "user", "content": "look"}, {"role": "assistant", "content": "nice"}]}]
    with pytest.raises(TypeError):
        to_items(["p"], [[{"role": "assistant", "content": "c"}]])
    with pytest.raises(ValueError):
        to_items(["p", "q"], ["c"])


# --- against the real app ------------------------------------------------------------------------------------


def test_sync_function_equals_score_for_both_formats(live_server: str) -> None:
    reward = RewardFunction(base_url=live_server, timeout=30)
    try:
        for batch in (standard_batch(), chat_batch()):
            with httpx.Client(base_url=live_server, timeout=30) as http:
                direct = http.post("/score", json={"items": direct_items(batch)}).json()["rewards"]
            rewards = reward(**batch)
            assert len(rewards) == len(PROMPTS) * G
            assert rewards == pytest.approx(direct, abs=1e-5)
    finally:
        reward.close()


async def test_async_function_equals_score_for_both_formats(make_client: Any) -> None:
    async with make_client("llama") as http:
        client = AsyncRewardClient("http://test", transport=httpx.ASGITransport(app=http.app))
        reward = AsyncRewardFunction(client)
        for batch in (standard_batch(), chat_batch()):
            direct = (await http.post("/score", json={"items": direct_items(batch)})).json()["rewards"]
            rewards = await reward(**batch)
            assert rewards == pytest.approx(direct, abs=1e-5)
        await reward.aclose()  # a client passed in stays open: its owner closes it
        assert (await client.score([("a", "b")])).rewards
        await client.aclose()


async def test_an_item_the_real_server_refuses_becomes_none(make_client: Any) -> None:
    batch = chat_batch()
    batch["completions"][4] = [{"role": "tool", "content": "42"}]  # the last message must be the assistant's
    async with make_client("llama") as http:
        ok_items = [item for i, item in enumerate(direct_items(batch)) if i != 4]
        direct = (await http.post("/score", json={"items": ok_items})).json()["rewards"]
        async with AsyncRewardClient("http://test", transport=httpx.ASGITransport(app=http.app)) as client:
            rewards = await AsyncRewardFunction(client)(**batch)
    assert rewards[4] is None
    assert [r for i, r in enumerate(rewards) if i != 4] == pytest.approx(direct, abs=1e-5)


# --- fallback and failures (MockTransport) -------------------------------------------------------------------


class Picky:
    """A fake /score that refuses the whole request (422) when any response is "BAD", like the real server."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        items = json.loads(request.content)["items"]
        self.calls.append(len(items))
        for i, item in enumerate(items):
            response = item["response"] if "response" in item else item["messages"][-1]["content"]
            if response == "BAD":
                body = {"error": {"type": "validation_error", "message": "bad", "param": f"items[{i}].response"}}
                return httpx.Response(422, json=body)
        rewards = [float(len(item.get("response", ""))) for item in items]
        items_out = [{"reward": r, "num_tokens": 1, "truncated": False} for r in rewards]
        return httpx.Response(200, json={"rewards": rewards, "items": items_out, "fingerprint": "fp"})


def test_sync_fallback_gives_none_only_to_the_refused_item() -> None:
    picky = Picky()
    batch = standard_batch()
    batch["completions"][2] = "BAD"
    client = RewardClient("http://fake", transport=httpx.MockTransport(picky), max_items_per_request=64)
    rewards = RewardFunction(client)(**batch)
    assert rewards == [float(len(c)) if c != "BAD" else None for c in batch["completions"]]
    assert picky.calls == [6] + [1] * 6  # the batch, then item by item
    client.close()


async def test_async_fallback_gives_none_only_to_the_refused_item() -> None:
    picky = Picky()
    batch = standard_batch()
    batch["completions"][0] = "BAD"
    client = AsyncRewardClient("http://fake", transport=httpx.MockTransport(picky), max_items_per_request=64)
    rewards = await AsyncRewardFunction(client)(**batch)
    assert rewards[0] is None and rewards[1:] == [float(len(c)) for c in batch["completions"][1:]]
    assert picky.calls == [6] + [1] * 6
    await client.aclose()


@pytest.mark.parametrize("status", [500, 401])
async def test_server_failures_are_raised_not_turned_into_none(status: int) -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"type": "x", "message": "down", "param": None}})

    sync = RewardFunction(RewardClient("http://fake", transport=httpx.MockTransport(broken), max_items_per_request=8))
    with pytest.raises(RewardServerError) as caught:
        sync(**standard_batch())
    assert caught.value.status_code == status
    async_client = AsyncRewardClient("http://fake", transport=httpx.MockTransport(broken), max_items_per_request=8)
    with pytest.raises(RewardServerError):
        await AsyncRewardFunction(async_client)(**standard_batch())
    sync.client.close()
    await async_client.aclose()


async def test_connection_failures_raise_after_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    sync = RewardFunction(base_url=url, max_retries=1, backoff_base=0.01, max_items_per_request=8)
    with pytest.raises(RewardServerError) as caught:
        sync(**standard_batch())
    assert caught.value.type == "connection_error"
    sync.close()
    reward = AsyncRewardFunction(base_url=url, max_retries=1, backoff_base=0.01, max_items_per_request=8)
    with pytest.raises(RewardServerError) as caught:
        await reward(**chat_batch())
    assert caught.value.type == "connection_error"
    await reward.aclose()


def test_client_and_client_arguments_are_exclusive() -> None:
    client = RewardClient("http://fake")
    with pytest.raises(ValueError):
        RewardFunction(client, base_url="http://other")
    client.close()


async def test_the_url_alone_is_the_natural_call(live_server: str) -> None:
    """`RewardFunction("http://...")` used to fail at the first batch: 'str' object has no attribute 'score'."""
    sync = RewardFunction(live_server, timeout=30)
    async_reward = AsyncRewardFunction(live_server, timeout=30)
    try:
        batch = standard_batch()
        assert sync(**batch) == pytest.approx(await async_reward(**batch), abs=1e-6)
        assert sync.client.base_url == live_server
    finally:
        sync.close()
        await async_reward.aclose()
    with pytest.raises(ValueError, match="twice"):
        RewardFunction(live_server, base_url=live_server)


def test_a_grpo_trainer_step_against_the_live_server(live_server: str, tmp_path: Any) -> None:
    """TRL's own GRPOTrainer (1.16) runs one step with `RewardFunction(url)` as its reward function: it generates
    G completions per prompt with a tiny policy, calls the function as it calls any, and logs the rewards' mean."""
    pytest.importorskip("trl", reason="TRL is not installed (.ci/install adds it)")
    import pyarrow as pa
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from tests import tiny

    tokenizer = tiny.byte_level_tokenizer(bos=False, chat=True)
    torch.manual_seed(0)
    config = tiny.llama_config(tokenizer)
    config.architectures = None
    LlamaForCausalLM(config).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    calls: list[tuple[list[str], list[str], list[float | None]]] = []

    class Recorded(RewardFunction):
        def __call__(self, prompts: Any, completions: Any, completion_ids: Any = None, **kwargs: Any) -> Any:
            rewards = super().__call__(prompts, completions, completion_ids, **kwargs)
            calls.append((list(prompts), list(completions), rewards))
            return rewards

    reward = Recorded(live_server, timeout=30)
    # a fixed fingerprint: hashing this pyarrow build's table fails in datasets (its MonthDayNano type says it is
    # `builtins.MonthDayNano`, which dill cannot find); nothing here depends on the hash
    dataset = Dataset(pa.table({"prompt": PROMPTS * 2}), fingerprint="prompts")
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2 * G,
        num_generations=G,
        max_completion_length=8,
        max_steps=1,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
    )
    try:
        trainer = GRPOTrainer(model=str(tmp_path / "policy"), reward_funcs=[reward], args=args, train_dataset=dataset)
        trainer.train()
    finally:
        reward.close()
    [(prompts, completions, rewards)] = calls
    assert len(completions) == 2 * G and all(r is not None for r in rewards)
    with RewardClient(live_server) as client:
        want = client.score(list(zip(prompts, completions, strict=True))).rewards
    assert rewards == pytest.approx(want, abs=1e-6)
    logged = next(h for h in trainer.state.log_history if "rewards/reward_server/mean" in h)
    assert logged["rewards/reward_server/mean"] == pytest.approx(sum(want) / len(want), abs=1e-5)


class Ensemble(Picky):
    """A fake ensemble: each item's members 1 and 1 + len(response), so its std is len(response) / 2."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        response = super().__call__(request)
        body = response.json()
        for item, reward in zip(body["items"], body["rewards"], strict=True):
            item.update(members={"a": 1.0, "b": 1.0 + reward}, std=reward / 2)
        return httpx.Response(response.status_code, json=body)


def test_the_spread_is_logged_as_a_zero_weight_reward_function() -> None:
    fake, plain = Ensemble(), Picky()
    batch = standard_batch()
    reward = RewardFunction(
        RewardClient("http://fake", transport=httpx.MockTransport(fake), max_items_per_request=64), name="rm"
    )
    spread = reward.spread()
    assert spread.__name__ == "rm_std"  # TRL logs it as rewards/rm_std/mean
    rewards, spreads = reward(**batch), spread(**batch)
    assert spreads == [r / 2 for r in rewards] and fake.calls == [6]  # read from the batch just scored
    other = {**batch, "completions": batch["completions"][::-1]}
    assert spread(**other) == [r / 2 for r in rewards[::-1]] and fake.calls == [6, 6]  # another batch: scored
    single = RewardFunction(RewardClient("http://fake", transport=httpx.MockTransport(plain), max_items_per_request=64))
    single(**batch)
    assert single.spread()(**batch) == [None] * 6  # one model has no spread
