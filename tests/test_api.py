"""The HTTP API in-process (ASGI): shapes, parity with the model, cross-request batching, every error status."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from app.model.recipe import ScoringInput
from app.model.reward_model import RewardModel

HH = "Human: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Spain?"


def expected(model: RewardModel, inputs: list[ScoringInput]) -> list[float]:
    return [model.score([e])[0] for e in model.encoder.encode_batch(inputs)]


async def test_score_matches_the_model_and_reports_tokens(make_client: Any, load: Callable[..., RewardModel]) -> None:
    items = [
        {"prompt": HH, "response": "Madrid."},
        {"prompt": "hi", "response": "hello"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    async with make_client("llama") as client:
        r = await client.post("/score", json={"items": items})
        info = (await client.get("/info")).json()
    assert r.status_code == 200, r.text
    body = r.json()
    model = load("llama")
    want = expected(model, [ScoringInput(HH, "Madrid."), ScoringInput("hi", "hello")])
    assert body["rewards"][:2] == pytest.approx(want, abs=1e-5)
    assert body["rewards"][2] == pytest.approx(body["rewards"][1], abs=1e-5)  # same conversation, two shapes
    assert [i["num_tokens"] for i in body["items"]] == [
        len(e)
        for e in model.encoder.encode_batch(
            [ScoringInput(HH, "Madrid."), ScoringInput("hi", "hello"), ScoringInput("hi", "hello")]
        )
    ]
    assert [i["truncated"] for i in body["items"]] == [False] * 3
    assert body["fingerprint"] == info["fingerprint"]


async def test_truncation_is_reported(make_client: Any) -> None:
    async with make_client("gpt2") as client:
        info = (await client.get("/info")).json()
        long = "the quick brown fox " * 200
        r = await client.post(
            "/score", json={"items": [{"prompt": long, "response": "ok"}, {"prompt": "a", "response": "b"}]}
        )
    items = r.json()["items"]
    assert items[0]["truncated"] is True and items[0]["num_tokens"] == info["max_length"]
    assert items[1]["truncated"] is False


async def test_compare_is_bradley_terry_of_the_two_rewards(make_client: Any) -> None:
    pairs = [
        {"prompt": HH, "response_a": "Madrid.", "response_b": "I do not know."},
        {"messages": [{"role": "user", "content": "hi"}], "response_a": "hello", "response_b": "go away"},
    ]
    async with make_client("llama") as client:
        r = await client.post("/compare", json={"pairs": pairs})
        s = await client.post(
            "/score",
            json={"items": [{"prompt": HH, "response": "Madrid."}, {"prompt": HH, "response": "I do not know."}]},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    ra, rb = s.json()["rewards"]
    assert body["pairs"][0]["a"]["reward"] == pytest.approx(ra, abs=1e-5)
    assert body["pairs"][0]["b"]["reward"] == pytest.approx(rb, abs=1e-5)
    for p, pair in zip(body["probabilities"], body["pairs"], strict=True):
        assert p == pytest.approx(1 / (1 + math.exp(-(pair["a"]["reward"] - pair["b"]["reward"]))), abs=1e-9)
        assert pair["probability"] == p


async def test_info_health_ready_docs(make_client: Any) -> None:
    async with make_client("value_head") as client:
        info = (await client.get("/info")).json()
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.get("/ready")).json()["ready"] is True
        assert (await client.get("/docs")).status_code == 200
        spec = (await client.get("/openapi.json")).json()
    assert info["format"] == "value_head" and info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["recipe"]["template"] == "chat" and info["max_length"] == 256
    assert {"/score", "/compare", "/info", "/ready", "/health"} <= set(spec["paths"])


async def test_concurrent_requests_are_batched_together_and_each_gets_its_own_results(
    make_client: Any, load: Callable[..., RewardModel]
) -> None:
    model = load("gpt2")
    requests = [[ScoringInput(f"prompt number {i}", "reply " * (1 + i % 7))] * (1 + i % 3) for i in range(40)]
    async with make_client("gpt2") as client:
        worker = client.app.state.workers[0]
        before = worker.stats.batches
        responses = await asyncio.gather(
            *(
                client.post("/score", json={"items": [{"prompt": x.prompt, "response": x.response} for x in req]})
                for req in requests
            )
        )
        batches = worker.stats.batches - before
    for req, resp in zip(requests, responses, strict=True):
        assert resp.status_code == 200
        assert resp.json()["rewards"] == pytest.approx(expected(model, req), abs=1e-5)
    assert batches < len(requests)  # items of different requests shared forward passes


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"items": []}, "items"),
        ({}, "items"),
        ({"items": [{"prompt": "a"}]}, "items[0]"),
        ({"items": [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": 3}]}, "items[1].response"),
        ({"items": [{"prompt": ["a"], "response": "b"}]}, "items[0].prompt"),
        ({"items": [{"prompt": "a", "response": "b", "reponse": "typo"}]}, "items[0].reponse"),
        ({"items": [{"messages": [{"role": "user", "content": "hi"}]}]}, "items[0]"),
        ({"items": [{"messages": [{"role": "assistant", "content": 5}]}]}, "items[0].messages[0].content"),
        ({"items": [{"messages": []}]}, "items[0].messages"),
        ({"items": "nope"}, "items"),
    ],
)
async def test_invalid_score_bodies_are_422_with_where(make_client: Any, body: dict[str, Any], param: str) -> None:
    async with make_client("gpt2") as client:
        r = await client.post("/score", json=body)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["type"] == "validation_error" and error["message"]
    assert error["param"] == param


async def test_other_bad_requests(make_client: Any) -> None:
    async with make_client("gpt2") as client:
        bad_json = await client.post("/score", content=b"{not json", headers={"content-type": "application/json"})
        pair = await client.post("/compare", json={"pairs": [{"prompt": "a", "response_a": "b"}]})
        both = await client.post(
            "/compare",
            json={
                "pairs": [
                    {
                        "prompt": "a",
                        "messages": [{"role": "user", "content": "a"}],
                        "response_a": "b",
                        "response_b": "c",
                    }
                ]
            },
        )
        missing = await client.get("/nope")
        method = await client.get("/score")
    assert bad_json.status_code == 422 and bad_json.json()["error"]["type"] == "validation_error"
    assert pair.status_code == 422 and pair.json()["error"]["param"] == "pairs[0].response_b"
    assert both.status_code == 422 and "exactly one" in both.json()["error"]["message"]
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    assert method.status_code == 405 and method.json()["error"]["type"] == "method_not_allowed"


async def test_too_many_items_is_413(make_client: Any) -> None:
    async with make_client("gpt2", max_items_per_request=3) as client:
        ok = await client.post("/score", json={"items": [{"prompt": "a", "response": "b"}] * 3})
        big = await client.post("/score", json={"items": [{"prompt": "a", "response": "b"}] * 4})
        pairs = await client.post(
            "/compare", json={"pairs": [{"prompt": "a", "response_a": "b", "response_b": "c"}] * 2}
        )
    assert ok.status_code == 200
    assert big.status_code == 413 and big.json()["error"]["type"] == "payload_too_large"
    assert pairs.status_code == 413  # a pair is two items


async def test_full_queue_is_429_at_once_and_nothing_is_lost(make_client: Any) -> None:
    async with make_client("gpt2", max_queue_items=8) as client:
        worker = client.app.state.workers[0]
        release = asyncio.Event()
        entered = threading.Event()
        gate_model = worker.model.run
        loop = asyncio.get_running_loop()

        def slow_run(batch: Any) -> list[list[float]]:
            entered.set()
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=30)
            return gate_model(batch)

        worker.model.run = slow_run  # type: ignore[method-assign]
        try:
            body = {"items": [{"prompt": "a", "response": "b"}] * 4}
            first = asyncio.create_task(client.post("/score", json=body))  # taken by the worker, then blocks
            await asyncio.to_thread(entered.wait, 30)
            queued = [asyncio.create_task(client.post("/score", json=body)) for _ in range(2)]  # fills the queue
            while worker.queued_items < 8:
                await asyncio.sleep(0.01)
            rejected = await client.post("/score", json=body)
            assert rejected.status_code == 429
            assert rejected.headers["retry-after"] == "1"
            assert rejected.json()["error"]["type"] == "overloaded"
            release.set()
            done = await asyncio.gather(first, *queued)
            assert [r.status_code for r in done] == [200, 200, 200]
            after = await client.post("/score", json=body)  # recovers
            assert after.status_code == 200
        finally:
            release.set()
            worker.model.run = gate_model  # type: ignore[method-assign]


async def test_failing_batch_fails_its_requests_only_and_the_worker_survives(make_client: Any) -> None:
    async with make_client("gpt2") as client:
        worker = client.app.state.workers[0]
        real = worker.model.run
        calls = {"n": 0}

        def flaky(batch: Any) -> list[list[float]]:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated out of memory")
            return real(batch)

        worker.model.run = flaky  # type: ignore[method-assign]
        try:
            failed = await client.post("/score", json={"items": [{"prompt": "a", "response": "b"}]})
            ok = await client.post("/score", json={"items": [{"prompt": "a", "response": "b"}]})
        finally:
            worker.model.run = real  # type: ignore[method-assign]
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "backend_error"
    assert ok.status_code == 200


async def test_non_finite_reward_is_a_typed_error_not_invalid_json(make_client: Any) -> None:
    async with make_client("gpt2") as client:
        worker = client.app.state.workers[0]
        real = worker.model.run
        worker.model.run = lambda batch: [[math.nan]] * len(batch)  # type: ignore[method-assign]
        try:
            r = await client.post("/score", json={"items": [{"prompt": "a", "response": "b"}]})
        finally:
            worker.model.run = real  # type: ignore[method-assign]
    assert r.status_code == 500
    assert r.json()["error"] == {
        "type": "backend_error",
        "message": "the model produced a non-finite reward (nan) for item 0",
        "param": "items[0]",
    }


async def test_not_ready_is_503(make_client: Any) -> None:
    async with make_client("gpt2") as client:
        client.app.state.workers[0].ready = False
        ready = await client.get("/ready")
        score = await client.post("/score", json={"items": [{"prompt": "a", "response": "b"}]})
        client.app.state.workers[0].ready = True
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert score.status_code == 503 and score.json()["error"]["type"] == "not_ready"
    assert score.headers["retry-after"] == "1"


async def test_the_served_fingerprint_changes_with_anything_that_moves_a_reward(
    make_client: Any, checkpoints: dict[str, Any]
) -> None:
    """Equal fingerprints, equal rewards: two identical servers agree; the dtype, the kernels (stock linears, or
    fixed row blocks instead of the measured calls) and the normalization in force each change it."""
    from asgi_lifespan import LifespanManager

    from app.model.loading import load_reward_model
    from app.server.main import create_app
    from tests.conftest import test_settings

    invariant: list[bool] = []

    async def served(name: str, model: RewardModel | None = None, **overrides: object) -> str:
        app = create_app(test_settings(checkpoints[name], **overrides), model=model, wait=True)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                info = (await client.get("/info")).json()
                invariant.append(info["kernels"]["batch_invariant"])
                return str(info["fingerprint"])

    first = await served("openrlhf")
    assert await served("openrlhf") == first
    if invariant[0]:  # else this CPU's kernels are stock either way (`kernels.note` says why)
        assert await served("openrlhf", batch_invariant=False) != first
        assert await served("openrlhf", block_rows=64) != first
    assert await served("openrlhf", normalize=True) != first
    bf16 = load_reward_model(checkpoints["openrlhf"], dtype="bfloat16", device="cpu")
    assert await served("openrlhf", model=bf16) != first
