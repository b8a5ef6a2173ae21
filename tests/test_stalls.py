"""No request stalls the server (#29), in-process: each finding of the hostile-client review, shown refused or bounded.
The live-process side (connections, headers, bodies on the wire, the soak) is tests/test_hostile.py."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.model.checkpoint import Normalization
from app.model.conversations import KNOWN_FORMATS
from app.model.recipe import Formatted, ScoringInput
from app.model.textcut import char_budget, longest_token
from app.server.decode import read_json
from app.server.openrlhf import QueryReader
from app.settings import Settings
from tests.conftest import test_settings
from tests.test_robustness import ITEM, gate, gate_tokenizer

JSON = {"content-type": "application/json"}


def transcript(turns: int) -> str:
    return "\n\n".join(f"{'Human' if i % 2 == 0 else 'Assistant'}: turn {i}" for i in range(turns))


# ---- 1, 2, 9: limits while decoding, linear in the body ------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"items": [{"prompt": "", "response": ""}] * 5000}, 413, "items", "REWARD_MAX_ITEMS_PER_REQUEST"),
        ({"query": [""] * 5000}, 413, "query", "REWARD_MAX_ITEMS_PER_REQUEST"),
        ({"items": [{"prompt": transcript(300), "response": "r"}]}, 422, "items[0].prompt", "REWARD_MAX_MESSAGES"),
        ({"query": ["q"], "prompts": [transcript(300)]}, 422, "prompts[0]", "REWARD_MAX_MESSAGES"),
        ({"items": [{"messages": [{"role": "user", "content": "x"}] * 300}]}, 422, "items[0].messages", "MESSAGES"),
        ({"items": [{"prompt": "p", "response": "x" * 300_000}]}, 422, "items[0].response", "REWARD_MAX_TEXT_CHARS"),
        ({"input": [list(range(250_000))]}, 413, "input[0]", "token ids"),
    ],
)
def test_a_limit_stops_the_decoder_where_it_is_broken(
    body: dict[str, Any], status: int, param: str, words: str
) -> None:
    """Refused at the first entry past the limit: a body of 5,000 entries is read no further than entry 1,025."""
    from app.server.errors import ServiceError

    with pytest.raises(ServiceError) as caught:
        read_json(json.dumps(body).encode(), Settings())
    assert caught.value.status_code == status and caught.value.param == param and words in caught.value.message


def test_the_decoder_reads_json_as_the_standard_library_does() -> None:
    body = b'{"a": [1, -2.5e3, 0.5, true, false, null, "\\u00e9\\n\\ud83d\\ude00"], "b": {"c": [], "d": {}}, "e": 0}'
    assert read_json(body, Settings()) == json.loads(body)
    assert read_json(b' {"x" : [ 1 , 2 ] } ', Settings()) == {"x": [1, 2]}
    ids = b'{"input": [[1, 2 ,3], [0, -5], [7, "x"], [1.5]]}'  # runs of integers take the fast path
    assert read_json(ids, Settings()) == json.loads(ids)
    bad_bodies = (b"", b"{", b'{"a": }', b"[1,]", b"[1 2]", b"[01]", b'{"a": 1} x', b"NaN", b'"\xff"', b"1" * 5000)
    for bad in bad_bodies:
        with pytest.raises(Exception, match=r"JSON|UTF-8|number"):
            read_json(bad, Settings())


async def test_hostile_bodies_are_refused_while_the_loop_keeps_answering(make_client: Any) -> None:
    """A 16 MB body of empty items was parsed and validated on the event loop (4.4 s, /health stalled), and
    /get_reward's pad stripping was quadratic (5 s for 1.3 MB)."""
    eos_run = {"query": ["x" + "<|endoftext|>" * 15_000] * 40}  # 6 MB, valid: 40 queries of 195k characters
    bodies = [
        ("/score", json.dumps({"items": [{"prompt": "", "response": ""}] * 500_000}), 413),
        ("/get_reward", json.dumps({"query": [""] * 2_000_000}), 413),
        ("/get_reward", json.dumps(eos_run), 200),
    ]
    async with make_client("gpt2", max_body_bytes=16 * 1024 * 1024) as client:
        for path, body, status in bodies:
            gaps: list[float] = []

            async def ticker(gaps: list[float] = gaps) -> None:
                while True:
                    began = time.perf_counter()
                    await asyncio.sleep(0.005)
                    gaps.append(time.perf_counter() - began)

            ticking = asyncio.create_task(ticker())
            began = time.perf_counter()
            response = await client.post(path, content=body, headers=JSON)
            took = time.perf_counter() - began
            ticking.cancel()
            assert response.status_code == status, response.text[:300]
            assert max(gaps, default=0.0) < 0.1, (path, status, gaps)  # the loop was never held 100 ms
            if status != 200:
                assert took < 1.0, (path, took)


def test_pad_stripping_is_linear() -> None:
    reader = QueryReader(formats=KNOWN_FORMATS, special_tokens=("<|im_end|>", "<|endoftext|>"), pads=("<|endoftext|>",))
    query = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok" + "<|im_end|>" * 150_000
    began = time.perf_counter()
    name, item = reader.read(query, None)
    plain, text_item = reader.read("question answer" + "<|endoftext|>" * 150_000, "question ")
    assert time.perf_counter() - began < 0.5  # quadratic: minutes
    assert name == "chatml" and isinstance(item, ScoringInput) and item.response == "ok"
    assert plain == "text" and text_item == ScoringInput("question ", "answer")


# ---- 3: text cut before tokenizing, in chunks -----------------------------------------------------------------------
def test_text_is_cut_to_what_the_model_can_read_and_items_that_fit_are_unchanged(load: Any) -> None:
    model = load("llama")
    encoder = model.encoder
    budget = char_budget(encoder.tokenizer, encoder.recipe.max_length)
    slack = 1 if encoder.tokenizer.backend_tokenizer.normalizer is None else 4
    assert budget == slack * longest_token(encoder.tokenizer) * encoder.recipe.max_length + 256
    words = " ".join(f"w{i % 97}" for i in range(budget))  # several budgets long
    items = [
        ScoringInput("short question", "short answer"),
        ScoringInput(words, "a reply"),
        ScoringInput("q", words),
        ScoringInput([{"role": "user", "content": words}], words),
        Formatted(words),
    ]
    seen: list[int] = []
    real = encoder._rust.encode_batch

    def spy(texts: Any, **options: Any) -> Any:
        seen.append(sum(len(t) if isinstance(t, str) else sum(map(len, t)) for t in texts))
        return real(texts, **options)

    encoder._rust = type("Spy", (), {"encode_batch": staticmethod(spy)})()
    try:
        cut = encoder.encode_batch(items, chunk_chars=budget)
    finally:
        del encoder._rust
        encoder._rust = type(encoder)(encoder.recipe, encoder.tokenizer)._rust
    whole = encoder._encode(items)  # the same items, uncut, in one call: what the server did before
    assert cut == whole  # identical ids, truncation flags and shared prefixes
    assert [e.truncated for e in cut] == [False, True, True, True, True]
    assert max(seen) <= 3 * budget + 2000  # no call saw a whole text, nor the whole request


# ---- 4, 7, 8: admission, cancellation, deadlines --------------------------------------------------------------------
async def test_a_burst_past_the_queue_is_refused_at_once_while_the_first_request_tokenizes(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_client("gpt2", max_queue_items=1024) as client:
        worker = client.app.state.workers[0]
        entered, release = gate_tokenizer(worker, monkeypatch)
        first = asyncio.create_task(client.post("/score", json={"items": [ITEM] * 1024}))
        await asyncio.to_thread(entered.wait, 30)
        began = time.perf_counter()
        burst = await asyncio.gather(*(client.post("/score", json={"items": [ITEM] * 1024}) for _ in range(5)))
        refused_in = time.perf_counter() - began
        release.set()
        assert (await first).status_code == 200
    assert [r.status_code for r in burst] == [429] * 5
    assert refused_in < 2.0  # before: each was tokenized first, then refused


async def test_a_cancelled_handler_cancels_its_items(make_client: Any) -> None:
    """Ray Serve cancels the handler when its client disconnects: its queued items must not be computed."""
    async with make_client("gpt2", max_batch_size=4) as client:
        worker = client.app.state.workers[0]
        entered, release = gate(worker)
        app = client.app
        body = json.dumps({"items": [ITEM] * 200}).encode()
        sent: list[dict[str, Any]] = []
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never disconnects: only the cancellation can stop it
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "path": "/score",
            "raw_path": b"/score",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "scheme": "http",
        }
        call = asyncio.create_task(app(scope, receive, send))
        await asyncio.to_thread(entered.wait, 30)  # the first plan of 4 is in the model
        while not (worker.queued_items == 196 and worker._handoff.holding):  # the next plan of 4 (counted) waits
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        release.set()
        while worker.queued_items:
            await asyncio.sleep(0.01)
        computed = worker.stats.items
    assert computed <= 8  # the plan already in the model (and at most the one handed off), not 200


async def test_the_deadline_counts_from_arrival(make_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokenizing counts: a 0.5 s deadline is answered at 0.5 s, not after 1.5 s of tokenizing plus 0.5 s."""
    async with make_client("gpt2") as client:
        worker = client.app.state.workers[0]
        real = worker.model.encoder.encode_batch

        def slow(items: Any, **options: Any) -> Any:
            time.sleep(1.5)
            return real(items, **options)

        monkeypatch.setattr(worker.model.encoder, "encode_batch", slow)
        began = time.perf_counter()
        response = await client.post("/score", json={"items": [ITEM]}, headers={"X-Request-Timeout": "0.5"})
        took = time.perf_counter() - began
        await asyncio.sleep(1.2)  # the tokenizer thread finishes; its items are never queued
        assert worker.queued_items == 0 and worker._reserved == 0
    assert response.status_code == 504 and took < 1.2


# ---- 6, 10: settings and /rank --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "value"),
    [("reward_mean", "nan"), ("reward_std", "1e-310"), ("reward_std", "1e-200"), ("reward_std", "inf"),
     ("request_timeout_s", "inf"), ("max_request_timeout_s", "nan")],
)  # fmt: skip
def test_non_finite_or_absurd_settings_are_refused_naming_them(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"REWARD_{name.upper()}", value)
    with pytest.raises(ValidationError, match=name):
        Settings()


def test_a_checkpoint_normalization_must_be_finite() -> None:
    for bad in ({"mean": math.nan}, {"std": 1e-200}, {"std": math.inf}, {"mean": 1e300}):
        with pytest.raises(ValidationError):
            Normalization(**bad)


async def test_rank_probabilities_are_bounded_by_the_group_size(make_client: Any) -> None:
    async with make_client("gpt2", max_probability_group=8) as client:
        big = {"groups": [{"prompt": "p", "responses": [f"r{i}" for i in range(9)]}], "probabilities": True}
        small = {"groups": [{"prompt": "p", "responses": [f"r{i}" for i in range(8)]}], "probabilities": True}
        refused, fine = await client.post("/rank", json=big), await client.post("/rank", json=small)
        plain = await client.post("/rank", json={**big, "probabilities": False})
    assert refused.status_code == 422 and "REWARD_MAX_PROBABILITY_GROUP" in refused.json()["error"]["message"]
    assert fine.status_code == 200 and len(fine.json()["groups"][0]["probabilities"]) == 8
    assert plain.status_code == 200


# ---- the model thread's death ends the process ----------------------------------------------------------------------
async def test_a_dead_model_thread_asks_the_process_to_exit(checkpoints: dict[str, Path], load: Any) -> None:
    import httpx
    from asgi_lifespan import LifespanManager

    from app.server.main import create_app

    died = threading.Event()
    app = create_app(test_settings(checkpoints["gpt2"]), model=load("gpt2"), on_model_death=died.set, wait=True)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client,
    ):

        def poisoned(*args: Any) -> None:
            raise RuntimeError("CUDA error: device-side assert triggered")

        # the plan taken, outside its own error handling (the split and retry inside `_run_plan`)
        app.state.workers[0]._run_plan = poisoned
        response = await client.post("/score", json={"items": [ITEM]})
        assert await asyncio.to_thread(died.wait, 10)
    assert response.status_code == 503
