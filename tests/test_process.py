"""Real server processes under load: soak, overload, SIGTERM mid-load. Loopback only, bounded in time: the soak runs
for a set time (as many requests as the machine serves in it), the others scale their deadlines by the speed measured
on their own server (tests/calibration.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.model.recipe import ScoringInput
from app.model.reward_model import RewardModel
from tests.calibration import TARGET_S, fire, seconds_per_request
from tests.conftest import rss_kib

pytestmark = pytest.mark.slow  # real server processes, each a load run


def items_for(i: int, n: int) -> list[dict[str, str]]:
    return [{"prompt": f"request {i} question {j}", "response": "answer " * (1 + (i + j) % 13)} for j in range(n)]


def test_soak_no_errors_exact_rewards_bounded_memory(server, load: Callable[..., RewardModel]) -> None:  # type: ignore[no-untyped-def]
    """Requests of 10 items, 64 kept in flight for ~25 s (REWARD_TEST_LOAD_S): as many requests as the machine serves
    now (a busy one serves fewer and does not time out). No error, every sampled reward exact, RSS (read under load at
    the end of each quarter of the time) flat from the first quarter on."""
    url, proc = server("gpt2")
    per, concurrency = 10, 64
    responses: dict[int, httpx.Response] = {}
    quarters: list[int] = []

    async def run() -> None:
        sent = 0
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

            async def sender(until: float) -> None:  # one request in flight; the next as soon as it is answered
                nonlocal sent
                while time.monotonic() < until:
                    i, sent = sent, sent + 1
                    responses[i] = await client.post("/score", json={"items": items_for(i, per)})

            async def sample(began: float) -> None:  # RSS at the end of each quarter, under load
                for q in range(1, 5):
                    await asyncio.sleep(began + q * TARGET_S / 4 - time.monotonic())
                    quarters.append(rss_kib(proc.pid))  # type: ignore[attr-defined]

            began = time.monotonic()
            await asyncio.gather(sample(began), *(sender(began + TARGET_S) for _ in range(concurrency)))

    began = time.monotonic()
    asyncio.run(run())
    elapsed = time.monotonic() - began
    requests = len(responses)
    assert sorted(responses) == list(range(requests))
    assert [r.status_code for r in responses.values() if r.status_code != 200] == []
    model = load("gpt2")
    for i in range(0, requests, max(1, requests // 20)):  # a sample against a direct forward pass, one item at a time
        inputs = [ScoringInput(x["prompt"], x["response"]) for x in items_for(i, per)]
        want = [model.score([e])[0] for e in model.encoder.encode_batch(inputs)]
        assert responses[i].json()["rewards"] == pytest.approx(want, abs=1e-5)
    growth = quarters[-1] / quarters[0] - 1
    print(
        f"soak: {requests} requests / {requests * per} items in {elapsed:.1f} s ({requests * per / elapsed:.0f} "
        f"items/s); RSS by quarter (MiB) {[q // 1024 for q in quarters]}, growth {growth:+.1%}"
    )
    assert growth < 0.10


def test_overload_gets_429_at_once_and_recovers(server) -> None:  # type: ignore[no-untyped-def]
    url, _ = server("gpt2", REWARD_MAX_QUEUE_ITEMS="64", REWARD_RETRY_AFTER_SECONDS="2")
    per_request = seconds_per_request(url, lambda i: {"items": items_for(i, 32)}, 2, at_least=1.0)  # 2 fill it
    bodies = [{"items": items_for(i, 32)} for i in range(300)]
    began = time.monotonic()
    responses = asyncio.run(fire(url, bodies, 128))
    elapsed = time.monotonic() - began
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}
    assert statuses.count(429) > 0 and statuses.count(200) > 0
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == "2" and rejected.json()["error"]["type"] == "overloaded"
    # never a hang: a refusal costs next to nothing, so the burst takes about the time of the requests it served
    assert elapsed < 30 + 3 * per_request * statuses.count(200), (elapsed, per_request, statuses.count(200))
    after = httpx.post(f"{url}/score", json={"items": items_for(0, 32)}, timeout=60 + 10 * per_request)
    assert after.status_code == 200  # recovered once the load dropped
    print(
        f"overload: calibrated {per_request * 1000:.0f} ms/request; {statuses.count(200)} served, "
        f"{statuses.count(429)} refused with 429, in {elapsed:.1f} s"
    )


def test_sigterm_mid_load_finishes_admitted_requests_and_exits_0(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every request that reached the app is answered 200 and delivered; the rest were refused at the connection."""
    url, proc = server("gpt2", REWARD_LOG_LEVEL="info")

    async def run() -> list[object]:
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=0)  # a connection per request
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            first_served = asyncio.Event()

            async def one(i: int) -> object:
                try:
                    response = await client.post("/score", json={"items": items_for(i, 16)})
                except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                    return type(exc).__name__  # no response: the server never read it (checked below)
                first_served.set()
                return response

            began = time.monotonic()
            tasks = [asyncio.create_task(one(i)) for i in range(400)]
            # Signal once load flows, most still queued (a fixed sleep raced a slow machine's first batch).
            await asyncio.wait_for(first_served.wait(), 120)
            first.append(time.monotonic() - began)
            os.kill(proc.pid, signal.SIGTERM)  # type: ignore[attr-defined]
            return await asyncio.gather(*tasks)

    first: list[float] = []  # how long the first answer took: this machine's speed now, which the drain is given
    results = asyncio.run(run())
    assert proc.wait(60 + 10 * first[0]) == 0  # type: ignore[attr-defined]
    served = [r for r in results if not isinstance(r, str)]
    assert len(served) < len(results), "SIGTERM came after the load had drained"
    assert all(r.status_code == 200 for r in served)  # type: ignore[attr-defined]
    log = (tmp_path / f"{url.rsplit(':', 1)[1]}.log").read_text().splitlines()
    handled = [json.loads(line) for line in log if line.startswith("{") and '"path": "/score"' in line]
    assert [h["status"] for h in handled if h["status"] != 200] == []  # nothing admitted was dropped or failed
    assert len(handled) == len(served)  # every request the app handled reached its client
    print(f"sigterm: {len(served)} admitted and served, {len(results) - len(served)} refused before admission")
