"""The Python client: retries and backoff, splitting and joining, typed errors (MockTransport), then round trips
against the real app (a live uvicorn server for the sync client, ASGI in-process for the async one)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from app.clients import (
    AsyncRewardClient,
    CompareResult,
    RankResult,
    RewardClient,
    RewardServerError,
    ScoreResult,
)
from tests.conftest import free_port

FP = "fp-1"


def error(status: int, type: str, message: str = "nope", param: str | None = None, **headers: str) -> httpx.Response:
    body = {"error": {"type": type, "message": message, "param": param}}
    return httpx.Response(status, json=body, headers=headers)


def item_score(reward: float) -> dict[str, Any]:
    return {"reward": reward, "num_tokens": 3, "truncated": False}


def score_body(rewards: list[float], fingerprint: str = FP) -> dict[str, Any]:
    return {"rewards": rewards, "items": [item_score(r) for r in rewards], "fingerprint": fingerprint}


def reward_of(item: dict[str, Any]) -> float:
    """Fake model: the reward is the number written in the response."""
    return float(item["response"])


class Fake:
    """A scripted server for MockTransport: records requests, answers from `script` first, then a fake model."""

    def __init__(self, limit: int = 1024, script: list[httpx.Response | Exception] | None = None) -> None:
        self.limit = limit
        self.script = list(script or [])
        self.requests: list[httpx.Request] = []
        self.fingerprints: list[str] = []  # consumed per /score call when set

    def paths(self) -> list[str]:
        return [r.url.path for r in self.requests]

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.url.path == path]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                raise step
            return step
        if request.url.path == "/info":
            limits = {"max_items_per_request": self.limit, "max_request_timeout_s": 900}
            return httpx.Response(200, json={"fingerprint": FP, "limits": limits})
        if request.url.path == "/ready":
            return httpx.Response(200, json={"ready": True, "queued_items": 0})
        body = json.loads(request.content)
        if request.url.path == "/score":
            fingerprint = self.fingerprints.pop(0) if self.fingerprints else FP
            return httpx.Response(200, json=score_body([reward_of(i) for i in body["items"]], fingerprint))
        if request.url.path == "/compare":
            pairs = [
                {
                    "probability": 0.5,
                    "a": item_score(float(p["response_a"])),
                    "b": item_score(float(p["response_b"])),
                }
                for p in body["pairs"]
            ]
            return httpx.Response(200, json={"probabilities": [0.5] * len(pairs), "pairs": pairs, "fingerprint": FP})
        if request.url.path == "/rank":
            groups = []
            for g in body["groups"]:
                rewards = [float(r) for r in g["responses"]]
                n = len(rewards)
                matrix = [[0.5] * n for _ in range(n)] if body["probabilities"] else None
                groups.append(
                    {
                        "rewards": rewards,
                        "mean": sum(rewards) / n,
                        "std": 0.0,
                        "advantages": [0.0] * n,
                        "loo_baselines": [0.0] * n,
                        "ranks": list(range(1, n + 1)),
                        "probabilities": matrix,
                    }
                )
            return httpx.Response(200, json={"groups": groups, "fingerprint": FP})
        return error(404, "not_found")


def sync_client(fake: Fake, **kwargs: Any) -> tuple[RewardClient, list[float]]:
    sleeps: list[float] = []
    kwargs.setdefault("max_items_per_request", 1024)
    client = RewardClient("http://fake", transport=httpx.MockTransport(fake), sleep=sleeps.append, **kwargs)
    return client, sleeps


def async_client(fake: Callable[..., Any], **kwargs: Any) -> tuple[AsyncRewardClient, list[float]]:
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    kwargs.setdefault("max_items_per_request", 1024)
    client = AsyncRewardClient("http://fake", transport=httpx.MockTransport(fake), sleep=sleep, **kwargs)
    return client, sleeps


ITEMS = [{"prompt": "p", "response": str(i)} for i in range(8)]


# --- retries -------------------------------------------------------------------------------------------------


def test_429_waits_what_retry_after_says_capped_by_backoff_max_plus_jitter() -> None:
    fake = Fake(
        script=[error(429, "overloaded", **{"Retry-After": "7"}), error(429, "overloaded", **{"Retry-After": "2"})]
    )
    client, sleeps = sync_client(fake, backoff_max=5)
    with client:
        result = client.score(ITEMS[:2])
    assert result.rewards == [0.0, 1.0]
    assert 5 <= sleeps[0] <= 5.5 and 2 <= sleeps[1] <= 2.5  # jitter up to backoff_base: no synchronized return
    assert fake.paths() == ["/score"] * 3


def test_retry_after_as_an_http_date_is_honoured() -> None:
    fake = Fake(script=[error(503, "not_ready", **{"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})])
    client, sleeps = sync_client(fake)
    with client:
        client.score(ITEMS[:1])
    assert 0 <= sleeps[0] <= 0.5 and len(sleeps) == 1  # a date in the past: retry at once (plus jitter)


def test_503_without_retry_after_backs_off_with_full_jitter() -> None:
    fake = Fake(script=[error(503, "not_ready")] * 4)
    client, sleeps = sync_client(fake, backoff_base=1, backoff_max=3)
    with client:
        assert client.score(ITEMS[:1]).rewards == [0.0]
    assert len(sleeps) == 4
    caps = [1, 2, 3, 3]  # min(backoff_max, base * 2**attempt)
    assert all(0 <= s <= cap for s, cap in zip(sleeps, caps, strict=True))
    assert len(set(sleeps)) > 1  # jittered, not a fixed schedule


def test_connection_errors_are_retried_then_succeed() -> None:
    fake = Fake(script=[httpx.ConnectError("refused"), httpx.ConnectTimeout("slow")])
    client, sleeps = sync_client(fake)
    with client:
        assert client.score(ITEMS[:3]).rewards == [0.0, 1.0, 2.0]
    assert len(fake.requests) == 3 and len(sleeps) == 2


def test_connection_errors_exhaust_into_a_typed_error_chaining_the_cause() -> None:
    fake = Fake(script=[httpx.ConnectError("refused")] * 10)
    client, sleeps = sync_client(fake, max_retries=3)
    with client, pytest.raises(RewardServerError) as caught:
        client.score(ITEMS[:1])
    assert caught.value.status_code is None and caught.value.type == "connection_error"
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert len(fake.requests) == 4 and len(sleeps) == 3


def test_exhausted_429_raises_with_the_body() -> None:
    response = error(429, "overloaded", "queue full", **{"Retry-After": "1"})
    fake = Fake(script=[response] * 3)
    client, sleeps = sync_client(fake, max_retries=2)
    with client, pytest.raises(RewardServerError) as caught:
        client.score(ITEMS[:1])
    e = caught.value
    assert (e.status_code, e.type, e.message, e.param) == (429, "overloaded", "queue full", None)
    assert json.loads(e.body or "") == {"error": {"type": "overloaded", "message": "queue full", "param": None}}
    assert len(fake.requests) == 3 and all(1 <= s <= 1.5 for s in sleeps) and len(sleeps) == 2


def test_retries_stop_at_the_budget_of_seconds_not_a_count() -> None:
    """An overloaded server may take minutes to drain: retry for as long as the budget lasts (5 retries of ~1 s
    used to give up after ~5 s), and no longer."""
    fake = Fake(script=[error(429, "overloaded", **{"Retry-After": "10"})] * 10)
    client, sleeps = sync_client(fake, retry_budget_s=25, backoff_max=60)
    with client, pytest.raises(RewardServerError) as caught:
        client.score(ITEMS[:1])
    assert caught.value.status_code == 429
    assert len(sleeps) == 2 and sum(sleeps) <= 25 and len(fake.requests) == 3  # a third wait would pass 25 s
    patient = Fake(script=[error(503, "not_ready", **{"Retry-After": "1"})] * 12)
    client, sleeps = sync_client(patient)  # the default budget outlasts any count of 5
    with client:
        assert client.score(ITEMS[:1]).rewards == [0.0]
    assert len(sleeps) == 12


def test_a_read_timeout_is_not_resent_unless_asked_and_says_why() -> None:
    fake = Fake(script=[httpx.ReadTimeout("slow")])
    client, sleeps = sync_client(fake, timeout=5)
    with client, pytest.raises(RewardServerError) as caught:
        client.score(ITEMS[:1])
    assert caught.value.type == "timeout" and "may still be scoring" in caught.value.message
    assert len(fake.requests) == 1 and sleeps == []
    again = Fake(script=[httpx.ReadTimeout("slow")])
    client, sleeps = sync_client(again, resend_timeouts=True)
    with client:
        assert client.score(ITEMS[:1]).rewards == [0.0]
    assert len(again.requests) == 2


def test_the_server_is_told_the_clients_deadline() -> None:
    """A little under the client's own timeout (the server drops the items of a request the client gave up on), within
    the server's bound once /info has told it."""
    fake = Fake()
    client, _ = sync_client(fake, timeout=20)
    with client:
        client.score(ITEMS[:1])
    assert next(r for r in fake.requests if r.url.path == "/score").headers["x-request-timeout"] == "18"
    bounded = Fake()
    client, _ = sync_client(bounded, timeout=5000, max_items_per_request=None)  # reads /info first
    with client:
        client.score(ITEMS[:1])
    assert next(r for r in bounded.requests if r.url.path == "/score").headers["x-request-timeout"] == "900"


@pytest.mark.parametrize(
    ("status", "type"),
    [(422, "validation_error"), (413, "payload_too_large"), (500, "backend_error"), (401, "unauthorized")],
)
def test_other_errors_are_not_retried(status: int, type: str) -> None:
    fake = Fake(script=[error(status, type, "bad item", "items[1].response")])
    client, sleeps = sync_client(fake)
    with client, pytest.raises(RewardServerError) as caught:
        client.score(ITEMS[:2])
    assert (caught.value.status_code, caught.value.type, caught.value.param) == (status, type, "items[1].response")
    assert caught.value.message == "bad item"
    assert len(fake.requests) == 1 and sleeps == []


def test_an_error_that_is_not_our_json_is_still_typed() -> None:
    fake = Fake(script=[httpx.Response(404, text="<html>not found</html>")])
    client, _ = sync_client(fake)
    with client, pytest.raises(RewardServerError) as caught:
        client.score(ITEMS[:1])
    assert caught.value.status_code == 404 and caught.value.type == "http_error"
    assert caught.value.body == "<html>not found</html>"
    assert len(fake.requests) == 1


def test_a_proxy_error_is_retried_but_the_servers_own_500_is_not() -> None:
    """Ray Serve's proxy answers an untyped 500 when the replica holding a request dies: resend (scoring is
    idempotent). A typed 500 is the server's own answer: resending would fail the same way."""
    proxy = [httpx.Response(500, text="Internal Server Error"), httpx.Response(502, text="<html>bad gateway</html>")]
    fake = Fake(script=proxy)
    client, sleeps = sync_client(fake)
    with client:
        assert client.score(ITEMS[:2]).rewards == [0.0, 1.0]
    assert len(fake.requests) == 3 and len(sleeps) == 2
    typed = Fake(script=[error(500, "internal_error", "boom")])
    client, sleeps = sync_client(typed)
    with client, pytest.raises(RewardServerError, match="boom"):
        client.score(ITEMS[:1])
    assert len(typed.requests) == 1 and sleeps == []


async def test_async_client_retries_the_same_way() -> None:
    fake = Fake(script=[httpx.ConnectError("refused"), error(429, "overloaded", **{"Retry-After": "3"})])
    client, sleeps = async_client(fake)
    async with client:
        result = await client.score(ITEMS[:2])
    assert result.rewards == [0.0, 1.0] and len(fake.requests) == 3
    assert len(sleeps) == 2 and 3 <= sleeps[1] <= 3.5

    failing = Fake(script=[error(422, "validation_error", param="items[0]")])
    client, sleeps = async_client(failing)
    async with client:
        with pytest.raises(RewardServerError) as caught:
            await client.score(ITEMS[:1])
    assert caught.value.status_code == 422 and caught.value.param == "items[0]" and sleeps == []


# --- splitting -----------------------------------------------------------------------------------------------


def test_long_lists_are_split_by_the_server_limit_read_once_and_joined_in_order() -> None:
    fake = Fake(limit=3)
    client, _ = sync_client(fake, max_items_per_request=None)
    with client:
        first = client.score(ITEMS)
        second = client.score([("q", "8"), ("q", "9")])  # tuples are (prompt, response)
    assert first.rewards == [float(i) for i in range(8)] and len(first.items) == 8
    assert first.fingerprint == FP
    assert second.rewards == [8.0, 9.0]
    assert fake.paths() == ["/info", "/score", "/score", "/score", "/score"]  # /info asked once
    assert [len(b["items"]) for b in fake.bodies("/score")] == [3, 3, 2, 2]
    assert fake.bodies("/score")[3]["items"][0] == {"prompt": "q", "response": "8"}


def test_compare_counts_a_pair_as_two_items() -> None:
    fake = Fake()
    client, _ = sync_client(fake, max_items_per_request=5)
    pairs = [{"prompt": "p", "response_a": str(i), "response_b": str(-i)} for i in range(5)]
    with client:
        result = client.compare(pairs)
    assert isinstance(result, CompareResult)
    assert [len(b["pairs"]) for b in fake.bodies("/compare")] == [2, 2, 1]
    assert result.rewards_a == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert result.rewards_b == [0.0, -1.0, -2.0, -3.0, -4.0]
    assert result.probabilities == [0.5] * 5 and result.pairs[3].b.reward == -3.0


def test_rank_groups_are_split_by_their_number_of_responses() -> None:
    fake = Fake()
    client, _ = sync_client(fake, max_items_per_request=4)
    groups = [
        {"prompt": "a", "responses": ["1", "2", "3"]},
        {"prompt": "b", "responses": ["4", "5"]},
        {"messages": [{"role": "user", "content": "c"}], "responses": ["6", "7"]},
    ]
    with client:
        plain = client.rank(groups)
        with_matrix = client.rank(groups[:1], probabilities=True)
    assert isinstance(plain, RankResult)
    bodies = fake.bodies("/rank")
    assert [len(b["groups"]) for b in bodies] == [1, 2, 1]
    assert bodies[1]["groups"][1]["messages"] == [{"role": "user", "content": "c"}]
    assert [b["probabilities"] for b in bodies] == [False, False, True]
    assert [g.rewards for g in plain.groups] == [[1.0, 2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]
    assert plain.groups[0].mean == 2.0 and plain.groups[0].ranks == [1, 2, 3]
    assert plain.groups[0].probabilities is None
    assert with_matrix.groups[0].probabilities == [[0.5] * 3] * 3


def test_chunks_scored_by_different_models_are_refused() -> None:
    fake = Fake()
    fake.fingerprints = [FP, "fp-2"]
    client, _ = sync_client(fake, max_items_per_request=4)
    with client, pytest.raises(RewardServerError) as caught:
        client.score(ITEMS)
    assert caught.value.type == "fingerprint_mismatch" and caught.value.status_code is None


async def test_async_chunks_go_out_concurrently_bounded_and_come_back_in_order() -> None:
    fake = Fake()
    state = {"in_flight": 0, "peak": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        first = json.loads(request.content)["items"][0]
        await asyncio.sleep(0.001 * (10 - float(first["response"])))  # later chunks answer first
        state["in_flight"] -= 1
        return fake(request)

    items = [{"prompt": "p", "response": str(i)} for i in range(10)]
    client, _ = async_client(handler, max_items_per_request=1, max_concurrency=3)
    async with client:
        result = await client.score(items)
    assert result.rewards == [float(i) for i in range(10)]
    assert len(fake.requests) == 10
    assert 1 < state["peak"] <= 3


async def test_async_fingerprint_mismatch_and_lazy_limit() -> None:
    fake = Fake(limit=5)
    fake.fingerprints = [FP, "fp-2"]
    client, _ = async_client(fake, max_items_per_request=None)
    async with client:
        with pytest.raises(RewardServerError) as caught:
            await client.score(ITEMS)
    assert caught.value.type == "fingerprint_mismatch"
    assert fake.paths() == ["/info", "/score", "/score"]


# --- headers, info, ready, lifecycle -------------------------------------------------------------------------


def test_api_key_is_sent_as_a_bearer_token() -> None:
    fake = Fake()
    client, _ = sync_client(fake, api_key="s3cret")
    with client:
        client.score(ITEMS[:1])
    anonymous, _ = sync_client(fake)
    with anonymous:
        anonymous.score(ITEMS[:1])
    assert fake.requests[0].headers["authorization"] == "Bearer s3cret"
    assert "authorization" not in fake.requests[1].headers


async def test_async_api_key_header() -> None:
    fake = Fake()
    client, _ = async_client(fake, api_key="k")
    async with client:
        await client.info()
    assert fake.requests[0].headers["authorization"] == "Bearer k"


def test_ready_is_a_single_probe() -> None:
    ok = Fake()
    loading = Fake(script=[httpx.Response(503, json={"ready": False, "queued_items": 0})])
    down = Fake(script=[httpx.ConnectError("refused")])
    results = []
    for fake in (ok, loading, down):
        client, sleeps = sync_client(fake)
        with client:
            results.append(client.ready())
        assert len(fake.requests) == 1 and sleeps == []
    assert results == [True, False, False]


async def test_async_ready_and_info() -> None:
    client, _ = async_client(Fake(script=[httpx.Response(503, json={"ready": False, "queued_items": 0})]))
    async with client:
        assert await client.ready() is False
        assert await client.ready() is True
        assert (await client.info())["limits"] == {"max_items_per_request": 1024, "max_request_timeout_s": 900}


def test_context_managers_close_the_pool() -> None:
    client, _ = sync_client(Fake())
    with client as entered:
        assert entered is client
    with pytest.raises(RuntimeError):
        client.score(ITEMS[:1])


async def test_async_context_manager_closes_the_pool() -> None:
    client, _ = async_client(Fake())
    async with client as entered:
        assert entered is client
    with pytest.raises(RuntimeError):
        await client.score(ITEMS[:1])


# --- against the real app ------------------------------------------------------------------------------------

HH = "Human: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Spain?"
REAL_ITEMS: list[dict[str, Any]] = [
    {"prompt": HH, "response": "Madrid."},
    {"prompt": "hi", "response": "hello"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey there"}]},
    {"prompt": "What is 2 + 2?", "response": "4"},
    {"prompt": "What is 2 + 2?", "response": "five, probably"},
]
REAL_PAIRS = [
    {"prompt": HH, "response_a": "Madrid.", "response_b": "I do not know."},
    {"messages": [{"role": "user", "content": "hi"}], "response_a": "hello", "response_b": "go away"},
    {"prompt": "What is 2 + 2?", "response_a": "4", "response_b": "5"},
]


def test_sync_client_round_trip_over_tcp(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=30) as http:
        direct = http.post("/score", json={"items": REAL_ITEMS}).json()
        direct_pairs = http.post("/compare", json={"pairs": REAL_PAIRS}).json()
        bad = http.post("/score", json={"items": [{"prompt": "x"}]}).json()
    with RewardClient(live_server, timeout=30) as client:
        assert client.ready() is True
        info = client.info()
        scored = client.score(REAL_ITEMS)
        compared = client.compare(REAL_PAIRS)
        with pytest.raises(RewardServerError) as caught:
            client.score([{"prompt": "x"}])
        groups = [
            {"prompt": "What is 2 + 2?", "responses": ["4", "five, probably", "4"]},
            {"prompt": HH, "responses": ["Madrid."]},
        ]
        ranked = client.rank(groups, probabilities=True)
    with httpx.Client(base_url=live_server, timeout=30) as http:
        direct_rank = http.post("/rank", json={"groups": groups, "probabilities": True}).json()
    with RewardClient(live_server, timeout=30, max_items_per_request=2) as split:
        split_scored = split.score(REAL_ITEMS)
        split_ranked = split.rank(groups)  # 3 + 1 responses: one group per request
    for got in (ranked, split_ranked):
        assert [g.rewards for g in got.groups] == [pytest.approx(g["rewards"], abs=1e-5) for g in direct_rank["groups"]]
        assert got.groups[0].ranks == direct_rank["groups"][0]["ranks"]
    matrix = ranked.groups[0].probabilities
    assert matrix is not None
    want = direct_rank["groups"][0]["probabilities"]
    assert [p for row in matrix for p in row] == pytest.approx([p for row in want for p in row], abs=1e-6)
    assert ranked.groups[0].advantages == pytest.approx(direct_rank["groups"][0]["advantages"], abs=1e-5)
    assert isinstance(scored, ScoreResult)
    assert scored.rewards == pytest.approx(direct["rewards"], abs=1e-5)
    assert [i.num_tokens for i in scored.items] == [i["num_tokens"] for i in direct["items"]]
    assert scored.fingerprint == direct["fingerprint"] == info["fingerprint"]
    assert split_scored.rewards == pytest.approx(direct["rewards"], abs=1e-5)
    assert compared.probabilities == pytest.approx(direct_pairs["probabilities"], abs=1e-6)
    assert compared.rewards_a == pytest.approx([p["a"]["reward"] for p in direct_pairs["pairs"]], abs=1e-5)
    assert compared.rewards_b == pytest.approx([p["b"]["reward"] for p in direct_pairs["pairs"]], abs=1e-5)
    assert caught.value.status_code == 422 and caught.value.param == bad["error"]["param"] == "items[0]"


def test_ready_is_false_when_nothing_listens() -> None:
    with RewardClient(f"http://127.0.0.1:{free_port()}", timeout=5) as client:
        assert client.ready() is False


async def test_async_client_round_trip_in_process(make_client: Any) -> None:
    async with make_client("llama", max_items_per_request=4) as http:
        direct = (await http.post("/score", json={"items": REAL_ITEMS[:4]})).json()
        direct_pairs = (await http.post("/compare", json={"pairs": REAL_PAIRS[:2]})).json()
        transport = httpx.ASGITransport(app=http.app)
        async with AsyncRewardClient("http://test", transport=transport) as client:
            assert await client.ready() is True
            scored = await client.score(REAL_ITEMS)  # 5 items > limit 4: split by the limit read from /info
            compared = await client.compare(REAL_PAIRS)  # 3 pairs = 6 items: split too
    assert scored.rewards[:4] == pytest.approx(direct["rewards"], abs=1e-5)
    assert len(scored.rewards) == 5 and scored.fingerprint == direct["fingerprint"]
    assert compared.probabilities[:2] == pytest.approx(direct_pairs["probabilities"], abs=1e-6)
    assert compared.rewards_a[2] == pytest.approx(scored.rewards[3], abs=1e-5)  # same prompt + "4"
    assert len(compared.pairs) == 3
