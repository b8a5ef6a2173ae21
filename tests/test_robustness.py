"""Security, limits, observability and faults, in-process: each behaviour shown failing the way it should."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import httpx
import pytest

ITEM = {"prompt": "What is the capital of France?", "response": "Paris."}


def gate(worker: Any) -> tuple[threading.Event, threading.Event]:
    """Make the worker's forward pass wait for `release`; `entered` is set when a batch reached the model."""
    entered, release = threading.Event(), threading.Event()
    real = worker.model.run

    def slow(batch: Any) -> list[list[float]]:
        entered.set()
        release.wait(30)
        return real(batch)

    worker.model.run = slow
    return entered, release


def gate_tokenizer(worker: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make tokenizing wait for `release`; `entered` is set when a request's items reached the tokenizer."""
    entered, release = threading.Event(), threading.Event()
    real = worker.model.encoder.encode_batch

    def slow(items: Any, **options: Any) -> Any:
        entered.set()
        release.wait(30)
        return real(items, **options)

    monkeypatch.setattr(worker.model.encoder, "encode_batch", slow)
    return entered, release


async def test_api_keys(make_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-key-value"
    async with make_client("gpt2", api_keys=[secret, "other"], log_format="json") as client:
        caplog.set_level(logging.INFO)
        missing = await client.post("/score", json={"items": [ITEM]})
        wrong = await client.post("/score", json={"items": [ITEM]}, headers={"Authorization": "Bearer nope"})
        basic = await client.post("/score", json={"items": [ITEM]}, headers={"Authorization": f"Basic {secret}"})
        ok = await client.post("/score", json={"items": [ITEM]}, headers={"Authorization": f"Bearer {secret}"})
        second = await client.get("/info", headers={"Authorization": "Bearer other"})
        health, ready = await client.get("/health"), await client.get("/ready")
        metrics = await client.get("/metrics")
        metrics_ok = await client.get("/metrics", headers={"Authorization": f"Bearer {secret}"})
    for r in (missing, wrong, basic, metrics):
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    assert ok.status_code == 200 and second.status_code == 200 and metrics_ok.status_code == 200
    assert health.status_code == 200 and ready.status_code == 200
    assert secret not in caplog.text  # keys are never logged


async def test_metrics_can_be_left_open(make_client: Any) -> None:
    async with make_client("gpt2", api_keys=["k"], protect_metrics=False) as client:
        assert (await client.get("/metrics")).status_code == 200


async def test_body_and_field_limits(make_client: Any) -> None:
    async with make_client("gpt2", max_body_bytes=2048, max_text_chars=50, max_messages=3) as client:
        big = await client.post("/score", json={"items": [{"prompt": "x" * 40, "response": "y"}] * 60})

        async def chunks() -> Any:
            for _ in range(10):
                yield b" " * 500  # no content-length: refused as it arrives

        chunked = await client.post("/score", content=chunks(), headers={"content-type": "application/json"})
        long_text = await client.post("/score", json={"items": [ITEM, {"prompt": "p", "response": "y" * 51}]})
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}] * 2
        many = await client.post("/score", json={"items": [{"messages": messages}]})
        pair = await client.post(
            "/compare", json={"pairs": [{"prompt": "z" * 51, "response_a": "a", "response_b": "b"}]}
        )
        fine = await client.post("/score", json={"items": [ITEM]})
    assert big.status_code == 413 and big.json()["error"]["type"] == "payload_too_large"
    assert chunked.status_code == 413
    assert long_text.status_code == 422 and long_text.json()["error"]["param"] == "items[1].response"
    assert many.status_code == 422 and many.json()["error"]["param"] == "items[0].messages"
    assert pair.status_code == 422 and pair.json()["error"]["param"] == "pairs[0].prompt"
    assert fine.status_code == 200


async def test_request_id_timing_headers_and_metrics(make_client: Any) -> None:
    async with make_client("gpt2") as client:
        given = await client.post("/score", json={"items": [ITEM] * 3}, headers={"X-Request-ID": "abc-123"})
        made = await client.post("/score", json={"items": [ITEM]})
        await client.post("/score", json={"items": []})
        text = (await client.get("/metrics")).text
    assert given.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) == 32
    for header in ("x-queue-time-ms", "x-inference-time-ms", "x-tokenize-time-ms", "x-total-time-ms"):
        assert float(given.headers[header]) >= 0
    assert float(given.headers["x-inference-time-ms"]) > 0
    assert 'reward_requests_total{route="/score",status="200"} 2.0' in text
    assert 'reward_requests_total{route="/score",status="422"} 1.0' in text
    assert 'reward_errors_total{type="validation_error"} 1.0' in text
    assert "reward_items_scored_total 4.0" in text
    assert "reward_batch_size_bucket" in text and "reward_padding_efficiency_bucket" in text
    assert "reward_queue_depth 0.0" in text and "reward_forward_seconds_count" in text
    assert 'reward_request_seconds_count{route="/score"} 3.0' in text


async def test_one_thread_runs_every_forward(
    make_client: Any, load: Any, checkpoints: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Warm-up and serving forwards run on the model thread and loading leaves no thread behind: each thread that ran
    a parallel torch op keeps an OpenMP team, and more teams than cores slow every forward (libgomp stops spinning)."""
    import app.server.startup
    from tests.conftest import test_settings

    loaders: list[threading.Thread] = []
    real_load = app.server.startup.load_reward_model

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        loaders.append(threading.current_thread())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(app.server.startup, "load_reward_model", recording_load)
    app.server.startup.load_model(test_settings(checkpoints["gpt2"]))
    assert len(loaders) == 1 and not loaders[0].is_alive()

    model = load("gpt2")
    callers: list[int] = []
    real = model.run

    def recording(batch: Any) -> list[list[float]]:
        callers.append(threading.get_ident())
        return real(batch)

    monkeypatch.setattr(model, "run", recording)
    async with make_client("gpt2") as client:
        assert callers  # the warm-up
        await asyncio.gather(*(client.post("/score", json={"items": [ITEM] * n}) for n in (1, 2, 3)))
        worker_thread = client.app.state.workers[0]._thread
    assert set(callers) == {worker_thread.ident}


async def test_deadline_gives_504_and_the_items_are_never_computed(make_client: Any) -> None:
    async with make_client("gpt2") as client:
        worker = client.app.state.workers[0]
        entered, release = gate(worker)
        try:
            blocker = asyncio.create_task(client.post("/score", json={"items": [ITEM]}))
            await asyncio.to_thread(entered.wait, 30)
            late = await client.post("/score", json={"items": [ITEM] * 5}, headers={"X-Request-Timeout": "0.2"})
            bad = await client.post("/score", json={"items": [ITEM]}, headers={"X-Request-Timeout": "-1"})
            items_before = worker.stats.items
            release.set()
            assert (await blocker).status_code == 200
            after = await client.post("/score", json={"items": [ITEM]})
        finally:
            release.set()
    assert late.status_code == 504 and late.json()["error"]["type"] == "timeout"
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "X-Request-Timeout"
    assert after.status_code == 200
    assert worker.stats.items - items_before == 1 + 1  # the blocker and `after`: the 5 timed-out items were dropped


async def test_failing_batch_is_split_and_only_the_bad_item_fails(make_client: Any) -> None:
    async with make_client("gpt2") as client:
        worker = client.app.state.workers[0]
        real = worker.model.run

        def oom_on_big_batches(batch: Any) -> list[list[float]]:
            if len(batch) > 2:
                raise RuntimeError("CUDA out of memory (simulated)")
            if batch.real_tokens > 60:  # only the poison item is this long
                raise RuntimeError("this item always fails")
            return real(batch)

        worker.model.run = oom_on_big_batches
        entered, release = gate(worker)  # hold the first batch so the rest queue up together
        try:
            first = asyncio.create_task(client.post("/score", json={"items": [ITEM]}))
            await asyncio.to_thread(entered.wait, 30)
            goods = [asyncio.create_task(client.post("/score", json={"items": [ITEM] * 3})) for _ in range(3)]
            poison = asyncio.create_task(
                client.post("/score", json={"items": [{"prompt": "x " * 80, "response": "y"}]})
            )
            while len(worker._inflight) < 5 or not worker._handoff.holding:  # all 10 in the plan handed off next
                await asyncio.sleep(0.01)
            release.set()
            done = await asyncio.gather(first, *goods, poison)
        finally:
            release.set()
            worker.model.run = real
    assert [r.status_code for r in done[:4]] == [200] * 4
    assert done[4].status_code == 500 and done[4].json()["error"]["type"] == "backend_error"


async def test_client_disconnect_drops_queued_items(make_client: Any) -> None:
    """A real uvicorn server in this process, so the model can be held; the client gives up; its items are dropped."""
    import uvicorn

    from tests.conftest import free_port

    async with make_client("gpt2") as client:
        app, worker = client.app, client.app.state.workers[0]
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="error"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        entered, release = gate(worker)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                blocker = asyncio.create_task(http.post("/score", json={"items": [ITEM]}, timeout=30))
                await asyncio.to_thread(entered.wait, 30)
                with pytest.raises(httpx.ReadTimeout):
                    await http.post("/score", json={"items": [ITEM] * 7}, timeout=0.5)
                await asyncio.sleep(0.2)  # the server notices the disconnect
                items_before = worker.stats.items
                release.set()
                assert (await blocker).status_code == 200
                assert (await http.post("/score", json={"items": [ITEM]}, timeout=30)).status_code == 200
        finally:
            release.set()
            server.should_exit = True
            await serving
    assert worker.stats.items - items_before == 1 + 1  # not the 7 abandoned ones
    assert "reward_items_dropped_total 7.0" in app.state.metrics.render().decode()
